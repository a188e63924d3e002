// End-to-end test of the OpenAI-compatible HTTP front with the official `openai` npm SDK (and raw
// fetch where the SDK hides the wire): models, completions and chat (whole and streamed), n = 3,
// stop, seed reproducibility, logprobs, per-request compression through "uncomp", greedy output
// equal to gRPC's, every error status (400, 401, 404, 429, 503), a client that disconnects
// mid-stream, wrong and missing keys (HTTP and gRPC). run_openai_e2e.sh starts the daemon.
// Env: UC_HTTP (http://127.0.0.1:PORT), UC_GRPC (127.0.0.1:PORT), UC_METRICS (http://...),
// UC_KEY, UC_ADMIN_KEY, UC_DAEMON_PID, UC_MODEL, NODE_PATH (the openai package).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(path.join(process.env.NODE_PATH, "x.js"));
const OpenAI = require("openai").default ?? require("openai");
const here = path.dirname(fileURLToPath(import.meta.url));
const { UC_HTTP, UC_GRPC, UC_METRICS, UC_KEY, UC_ADMIN_KEY, UC_MODEL } = process.env;
const client = new OpenAI({ baseURL: `${UC_HTTP}/v1`, apiKey: UC_KEY, maxRetries: 0, timeout: 120000 });
const PROMPT = "Once upon a time, in a small village by the sea,";
let failures = 0;
const results = [];

async function test(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.push(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failures++;
    results.push(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
  }
  console.log(results[results.length - 1]);
}

async function expectStatus(status, fn, where) {
  try {
    await fn();
  } catch (e) {
    assert.equal(e.status, status, `${where}: status ${e.status} (${e.message})`);
    return e;
  }
  assert.fail(`${where}: expected HTTP ${status}, got success`);
}

async function metric(name) {
  const text = await (await fetch(`${UC_METRICS}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
  return line ? Number(line.split(" ").pop()) : NaN;
}

async function waitIdle(ms) {
  const end = Date.now() + ms;
  for (;;) {
    const running = await metric("uncomp:num_requests_running");
    const waiting = await metric("uncomp:num_requests_waiting");
    if (running === 0 && waiting === 0) return;
    if (Date.now() > end) assert.fail(`still busy after ${ms} ms: running=${running} waiting=${waiting}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function grpc(...args) {
  return JSON.parse(execFileSync("/usr/bin/python3", [path.join(here, "grpc_side.py"), UC_GRPC, ...args], { encoding: "utf8" }));
}

async function collect(stream) {
  const out = { texts: {}, finish: {}, usage: null, chunks: 0, roles: {}, uncomp: null };
  for await (const ch of stream) {
    out.chunks++;
    if (ch.usage) out.usage = ch.usage;
    if (ch.uncomp) out.uncomp = ch.uncomp;
    for (const c of ch.choices) {
      const t = c.text ?? c.delta?.content ?? "";
      out.texts[c.index] = (out.texts[c.index] ?? "") + t;
      if (c.delta?.role) out.roles[c.index] = c.delta.role;
      if (c.finish_reason) out.finish[c.index] = c.finish_reason;
    }
  }
  return out;
}

await test("models lists the served model", async () => {
  const models = await client.models.list();
  assert.deepEqual(models.data.map((m) => m.id), [UC_MODEL]);
});

let greedy;
await test("completion (whole): greedy, length, exact usage, compression report", async () => {
  greedy = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 24, temperature: 0 });
  assert.equal(greedy.object, "text_completion");
  assert.equal(greedy.choices.length, 1);
  assert.equal(greedy.choices[0].finish_reason, "length");
  assert.equal(greedy.usage.completion_tokens, 24);
  const tok = execFileSync("/usr/bin/python3", ["-c", `
import sys; sys.path.insert(0, ${JSON.stringify(path.join(here, ".."))})
import grpc_client as gc
cl = gc.Client(sys.argv[1]); print(len(cl.inference.Tokenize(gc.pb.TokenizeRequest(text=sys.argv[2], add_special_tokens=True), timeout=30, metadata=[("authorization", "Bearer " + sys.argv[3])]).token_ids))`, UC_GRPC, PROMPT, UC_KEY], { encoding: "utf8" });
  assert.equal(greedy.usage.prompt_tokens, Number(tok), "prompt_tokens = the tokenizer's count");
  assert.equal(greedy.usage.total_tokens, greedy.usage.prompt_tokens + 24);
  assert.ok(greedy.choices[0].text.length > 0);
  assert.equal(greedy.uncomp.policy, "full");
});

await test("greedy output through HTTP equals gRPC's", async () => {
  const g = grpc("greedy", UC_KEY, PROMPT, "24");
  assert.equal(greedy.choices[0].text, g.text);
});

await test("completion (streamed) equals the whole one, with include_usage", async () => {
  const s = await collect(await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 24, temperature: 0, stream: true, stream_options: { include_usage: true } }));
  assert.equal(s.texts[0], greedy.choices[0].text);
  assert.equal(s.finish[0], "length");
  assert.deepEqual(s.usage, greedy.usage);
  assert.ok(s.chunks > 3, "streamed in several chunks");
});

await test("prompt as token ids and as a list of strings", async () => {
  const r = await client.completions.create({ model: UC_MODEL, prompt: ["Hello", "The sea"], max_tokens: 4, temperature: 0 });
  assert.equal(r.choices.length, 2);
  assert.deepEqual(r.choices.map((c) => c.index), [0, 1]);
  const ids = await client.completions.create({ model: UC_MODEL, prompt: [1, 200, 300], max_tokens: 3, temperature: 0 });
  assert.equal(ids.usage.prompt_tokens, 3);
});

await test("chat (whole and streamed) through the chat template", async () => {
  const messages = [{ role: "system", content: "You tell stories." }, { role: "user", content: [{ type: "text", text: "Tell me" }, { type: "text", text: "a story." }] }];
  const w = await client.chat.completions.create({ model: UC_MODEL, messages, max_completion_tokens: 16, temperature: 0 });
  assert.equal(w.object, "chat.completion");
  assert.equal(w.choices[0].message.role, "assistant");
  assert.equal(w.usage.completion_tokens, 16);
  const s = await collect(await client.chat.completions.create({ model: UC_MODEL, messages, max_tokens: 16, temperature: 0, stream: true }));
  assert.equal(s.texts[0], w.choices[0].message.content);
  assert.equal(s.roles[0], "assistant");
  assert.equal(s.finish[0], w.choices[0].finish_reason);
});

await test("n = 3: three choices, usage summed, streamed too", async () => {
  const r = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 8, temperature: 1, seed: 7, n: 3 });
  assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2]);
  assert.equal(r.usage.completion_tokens, 24);
  assert.equal(new Set(r.choices.map((c) => c.text)).size > 1, true, "the choices differ");
  const s = await collect(await client.chat.completions.create({ model: UC_MODEL, messages: [{ role: "user", content: "Hi" }], max_tokens: 6, temperature: 1, seed: 7, n: 3, stream: true, stream_options: { include_usage: true } }));
  assert.deepEqual(Object.keys(s.finish).sort(), ["0", "1", "2"]);
  assert.equal(s.usage.completion_tokens, 18);
});

await test("n = 2 forks one prefill: greedy choices equal n = 1, the prompt counted once", async () => {
  const one = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 8, temperature: 0 });
  const before = await metric("uncomp:request_prefill_time_seconds_count");
  const r = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 8, temperature: 0, n: 2 });
  assert.equal(await metric("uncomp:request_prefill_time_seconds_count") - before, 1, "one prefill for n = 2");
  assert.deepEqual(r.choices.map((c) => c.text), [one.choices[0].text, one.choices[0].text]);
  assert.equal(r.usage.prompt_tokens, one.usage.prompt_tokens);
  assert.equal(r.usage.completion_tokens, 16);
  const a = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 8, temperature: 1, seed: 11, n: 2 });
  const b = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 8, temperature: 1, seed: 11, n: 2 });
  assert.deepEqual(a.choices.map((c) => c.text), b.choices.map((c) => c.text), "seeded n = 2 reproducible");
  const s1 = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 8, temperature: 1, seed: 12 });
  assert.equal(a.choices[1].text, s1.choices[0].text, "choice 1 samples with seed + 1");
});

await test("echo with logprobs: the prompt's tokens and logprobs lead, the first null", async () => {
  const plain = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 4, temperature: 0, logprobs: 2 });
  const r = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 4, temperature: 0, echo: true, logprobs: 2 });
  const c = r.choices[0], lp = c.logprobs, np = r.usage.prompt_tokens;
  assert.equal(c.text, PROMPT + plain.choices[0].text);
  assert.equal(lp.tokens.length, np + 4);
  assert.equal(lp.token_logprobs[0], null);
  assert.equal(lp.top_logprobs[0], null);
  for (let i = 1; i < np + 4; i++) {
    assert.ok(Number.isFinite(lp.token_logprobs[i]) && lp.token_logprobs[i] <= 0, `logprob ${i}`);
    const tops = Object.values(lp.top_logprobs[i]);
    assert.equal(tops.length, 2);
    assert.ok(Math.max(...tops) >= lp.token_logprobs[i] - 1e-4, `top of ${i}`);
  }
  // the same generated tokens; the first one's logprob comes from the all-rows logits matmul
  // (rows batched differently), equal to ~1e-5
  assert.deepEqual(lp.tokens.slice(np), plain.choices[0].logprobs.tokens);
  lp.token_logprobs.slice(np).forEach((v, i) => assert.ok(Math.abs(v - plain.choices[0].logprobs.token_logprobs[i]) < 1e-3, `generated logprob ${i}`));
  for (let i = 1; i < np + 4; i++) assert.ok(lp.text_offset[i] >= lp.text_offset[i - 1]);
  // streamed: the prompt's logprobs come first, then the generated tokens'
  const toks = [], lps = [];
  for await (const ch of await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 4, temperature: 0, echo: true, logprobs: 2, stream: true })) {
    for (const x of ch.choices) if (x.logprobs) { toks.push(...x.logprobs.tokens); lps.push(...x.logprobs.token_logprobs); }
  }
  assert.deepEqual(toks, lp.tokens);
  assert.deepEqual(lps, lp.token_logprobs);
  // n = 2 with echo: each choice carries the prompt's logprobs
  const r2 = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 4, temperature: 0, echo: true, logprobs: 1, n: 2 });
  for (const ch of r2.choices) assert.deepEqual(ch.logprobs.token_logprobs.slice(0, np), lp.token_logprobs.slice(0, np));
});

await test("stop: the text ends before the stop string, finish_reason stop", async () => {
  const full = greedy.choices[0].text;
  const stop = full.slice(Math.floor(full.length / 2), Math.floor(full.length / 2) + 3);
  const r = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 24, temperature: 0, stop: [stop, "@@@@"] });
  assert.equal(r.choices[0].finish_reason, "stop");
  assert.equal(r.choices[0].text, full.slice(0, full.indexOf(stop)));
  const one = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 24, temperature: 0, stop });
  assert.equal(one.choices[0].text, r.choices[0].text);
});

await test("seed: the same seed reproduces, another seed differs", async () => {
  const ask = (seed) => client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 20, temperature: 1.0, seed });
  const [a, b, c] = [await ask(1234), await ask(1234), await ask(4321)];
  assert.equal(a.choices[0].text, b.choices[0].text);
  assert.notEqual(a.choices[0].text, c.choices[0].text);
});

await test("logprobs: completions (top 3) and chat (top 2)", async () => {
  const r = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 6, temperature: 0, logprobs: 3 });
  const lp = r.choices[0].logprobs;
  assert.equal(lp.tokens.length, 6);
  assert.equal(lp.tokens.join(""), r.choices[0].text);
  for (let i = 0; i < 6; i++) {
    assert.ok(lp.token_logprobs[i] <= 0);
    const tops = Object.values(lp.top_logprobs[i]);
    assert.ok(tops.length >= 1 && tops.length <= 3);
    assert.ok(Math.abs(Math.max(...tops) - lp.token_logprobs[i]) < 1e-4, "greedy picks the top token");
  }
  const c = await client.chat.completions.create({ model: UC_MODEL, messages: [{ role: "user", content: "Hi" }], max_tokens: 4, temperature: 0, logprobs: true, top_logprobs: 2 });
  const content = c.choices[0].logprobs.content;
  assert.equal(content.length, 4);
  assert.equal(content.map((t) => t.token).join(""), c.choices[0].message.content);
  for (const t of content) assert.equal(t.top_logprobs.length, 2);
});

await test("per-request compression through the uncomp object, report returned", async () => {
  const long = Array.from({ length: 30 }, (_, i) => `Line ${i}: the quick brown fox jumps over the lazy dog.`).join(" ");
  const r = await client.completions.create({ model: UC_MODEL, prompt: long, max_tokens: 4, temperature: 0, uncomp: { policy: "snapkv", kv_budget: 32 } });
  assert.equal(r.uncomp.policy, "snapkv");
  assert.equal(r.uncomp.kv_budget, 32);
  assert.ok(r.uncomp.kv_tokens_kept < r.uncomp.kv_tokens_full, `kept ${r.uncomp.kv_tokens_kept} of ${r.uncomp.kv_tokens_full}`);
  await expectStatus(400, () => client.completions.create({ model: UC_MODEL, prompt: "x", uncomp: { policy: "magic" } }), "unknown policy");
  // MiniCache composed with it: the same tokens kept, two layer pairs (of 8 layers) merged
  const m = await client.completions.create({ model: UC_MODEL, prompt: long, max_tokens: 4, temperature: 0, uncomp: { policy: "snapkv+minicache", kv_budget: 32, minicache_t: 0.5 } });
  assert.equal(m.uncomp.policy, "snapkv+minicache");
  assert.equal(m.uncomp.kv_tokens_kept, r.uncomp.kv_tokens_kept);
  assert.ok(m.uncomp.minicache && m.uncomp.minicache.pairs === 2 && m.uncomp.minicache.layers.length === 2 && m.uncomp.minicache.start === m.uncomp.minicache.layers[0] && m.uncomp.minicache.layers[1] >= m.uncomp.minicache.layers[0] + 2 && m.uncomp.minicache.merged > 0, JSON.stringify(m.uncomp.minicache));
  assert.ok(m.uncomp.kv_bytes_kept < r.uncomp.kv_bytes_kept, `minicache kept ${m.uncomp.kv_bytes_kept} bytes, snapkv ${r.uncomp.kv_bytes_kept}`);
  await expectStatus(400, () => client.completions.create({ model: UC_MODEL, prompt: "x", uncomp: { policy: "snapkv", minicache_t: 0.5 } }), "minicache_t without +minicache");
  const l = await client.completions.create({ model: UC_MODEL, prompt: long, max_tokens: 4, temperature: 0, uncomp: { policy: "snapkv+lorc", kv_budget: 32, lorc_ratio: 0.25 } });
  assert.equal(l.uncomp.policy, "snapkv+lorc");
  assert.ok(Math.abs(l.uncomp.lorc_ratio - 0.25) < 1e-6 && l.uncomp.lorc_rank_first > l.uncomp.lorc_rank_last, JSON.stringify(l.uncomp));
  assert.ok(l.uncomp.kv_bytes_kept < r.uncomp.kv_bytes_kept * 0.35, `lorc bytes ${l.uncomp.kv_bytes_kept} vs ${r.uncomp.kv_bytes_kept}`);
});

await test("400: bad fields are OpenAI error objects naming the field", async () => {
  const e = await expectStatus(400, () => client.completions.create({ model: UC_MODEL, prompt: "x", temperature: -1 }), "temperature");
  assert.equal(e.error?.param ?? e.param, "temperature");
  await expectStatus(400, () => client.completions.create({ model: UC_MODEL, prompt: "x", n: 99 }), "n");
  await expectStatus(400, () => client.chat.completions.create({ model: UC_MODEL, messages: [{ role: "wizard", content: "x" }] }), "role");
  await expectStatus(400, () => client.completions.create({ model: UC_MODEL, prompt: "" }), "empty prompt");
  const raw = await fetch(`${UC_HTTP}/v1/completions`, { method: "POST", headers: { authorization: `Bearer ${UC_KEY}` }, body: "{not json" });
  assert.equal(raw.status, 400);
  assert.equal((await raw.json()).error.type, "invalid_request_error");
});

await test("404: unknown model", async () => {
  const e = await expectStatus(404, () => client.completions.create({ model: "gpt-17", prompt: "x" }), "model");
  assert.match(e.message, /gpt-17/);
});

await test("401: wrong and missing keys (HTTP), and gRPC metadata keys", async () => {
  const wrong = new OpenAI({ baseURL: `${UC_HTTP}/v1`, apiKey: "not-the-key-123", maxRetries: 0 });
  await expectStatus(401, () => wrong.completions.create({ model: UC_MODEL, prompt: "x" }), "wrong key");
  await expectStatus(401, () => wrong.models.list(), "wrong key models");
  const missing = await fetch(`${UC_HTTP}/v1/chat/completions`, { method: "POST", body: "{}" });
  assert.equal(missing.status, 401);
  assert.equal((await missing.json()).error.code, "invalid_api_key");
  assert.equal((await fetch(`${UC_HTTP}/health`)).status, 200, "health needs no key");
  const g = grpc("keys", UC_KEY, UC_ADMIN_KEY);
  assert.deepEqual(g, { none: "UNAUTHENTICATED", wrong: "UNAUTHENTICATED", user: "OK", x_api_key: "OK", admin_with_user_key: "UNAUTHENTICATED", admin_with_admin_key: "OK", health_open: "OK" });
});

await test("disconnect mid-stream aborts the request", async () => {
  await waitIdle(10000);
  const ac = new AbortController();
  const stream = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 3000, ignore_eos: true, temperature: 0, stream: true }, { signal: ac.signal });
  let n = 0;
  try {
    for await (const ch of stream) {
      if (++n === 3) ac.abort();
    }
  } catch (e) {
    assert.ok(ac.signal.aborted, `aborted: ${e}`);
  }
  assert.equal(await metric("uncomp:num_requests_running") >= 0, true);
  await waitIdle(3000); // 3000 tokens would take far longer than this
  // a whole (non-streamed) request whose client gives up is aborted too
  const ac2 = new AbortController();
  const p = client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 3000, ignore_eos: true }, { signal: ac2.signal }).catch((e) => e);
  await new Promise((r) => setTimeout(r, 300));
  ac2.abort();
  await p;
  await waitIdle(3000);
});

await test("429: the queue is full (max-queued-requests)", async () => {
  // 2 run (max-running) and 4 wait (max-queued-requests); the next one is refused
  const acs = [];
  let refused = null;
  try {
    for (let i = 0; i < 10 && !refused; i++) {
      const ac = new AbortController();
      try {
        await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 3000, ignore_eos: true, stream: true }, { signal: ac.signal });
        acs.push(ac);
      } catch (e) {
        refused = e;
      }
    }
    assert.ok(refused, "no request was refused");
    assert.equal(refused.status, 429, refused.message);
    assert.equal(refused.error?.type ?? refused.type, "rate_limit_error");
    assert.ok(acs.length >= 4 && acs.length <= 6, `${acs.length} requests were admitted before the 429`);
  } finally {
    for (const ac of acs) ac.abort();
  }
  await waitIdle(5000);
});

await test("503: draining (SIGTERM) refuses new requests; health turns 503", async () => {
  const ac = new AbortController();
  const stream = await client.completions.create({ model: UC_MODEL, prompt: PROMPT, max_tokens: 3000, ignore_eos: true, stream: true }, { signal: ac.signal });
  const it = stream[Symbol.asyncIterator]();
  await it.next();
  process.kill(Number(process.env.UC_DAEMON_PID), "SIGTERM");
  const end = Date.now() + 5000;
  while ((await fetch(`${UC_HTTP}/health`)).status !== 503) {
    if (Date.now() > end) assert.fail("health never turned 503");
    await new Promise((r) => setTimeout(r, 50));
  }
  const e = await expectStatus(503, () => client.completions.create({ model: UC_MODEL, prompt: "x", max_tokens: 2 }), "draining");
  assert.match(e.message, /draining/);
  ac.abort();
});

console.log(`\n${results.length - failures}/${results.length} passed`);
process.exit(failures ? 1 : 0);

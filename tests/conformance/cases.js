// The tokenizer conformance test set: fixed strings for each hard case, then seeded random
// Unicode. Deterministic: the same list every run (the seed is fixed).
'use strict';

function rng(seed) {
    let x = seed >>> 0 || 1;
    return () => {
        x ^= x << 13;
        x >>>= 0;
        x ^= x >>> 17;
        x ^= x << 5;
        x >>>= 0;
        return x / 4294967296;
    };
}

const fixed = [
    // prose
    'Hello world', 'Hello, world!', 'The quick brown fox jumps over the lazy dog.',
    'Once upon a time, there was a little girl named Lily. She loved to play outside.',
    'It was the best of times, it was the worst of times; it was the age of wisdom...',
    '"Quoted" and \'single\' and `back` and «guillemets» and „low“ and ‘curly’.',
    'Mr. Smith paid $4.50 for 3 apples (a 10% discount) on 2024-01-15 at 10:30am.',
    'e-mail: someone@example.com, url: https://example.org/path?q=1&r=two#frag',
    // contractions in any case
    "don't", "DON'T", "Don'T", "I'm", "I'M", "you're", "YOU'RE", "we've", "WE'VE", "she'll",
    "SHE'LL", "he'd", "HE'D", "it's", "IT'S", "isn't", "ISN'T", "they'Re", "y'all", "'s", "'S",
    "o'clock", "rock'n'roll", "’s curly apostrophe", "can\u2019t",
    // code
    'def f(x):\n    return x**2  # comment',
    'int main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}',
    'for (let i = 0; i < n; i++) { a[i] += b[i] * 2; }',
    '<div class="x">&amp; &lt;tag&gt;</div>', 'SELECT * FROM t WHERE a >= 10 AND b <> \'x\';',
    '    indented four\n        indented eight\n', 'x=>x+1;y->z;a::b;c:=d;e!=f;g==h;i<=j',
    '{"key": [1, 2.5, -3e10, true, null], "nested": {"a": "b"}}',
    // numbers
    '0', '1', '12', '123', '1234', '12345', '123456', '1234567', '3.14159265358979',
    '1,000,000', '-42', '+7', '1e-9', '0x1F', '٠١٢٣٤٥٦٧٨٩', '१२३४५', '①②③', 'Ⅻ', '½ ¾ ²³',
    '１２３ fullwidth digits', '2024年1月15日',
    // whitespace runs, CRLF
    '', ' ', '  ', '   ', '\t', '\n', '\n\n', '\n\n\n', '\r\n', '\r\n\r\n', 'a\r\nb', 'a\rb',
    ' leading space', '  two leading', 'trailing space ', 'trailing two  ', ' both ',
    'a  b   c    d', 'tab\tseparated\tvalues', 'line1\nline2\r\nline3\rline4',
    ' \n \n ', '\t\t\tx', 'x\n\n\n\n\ny', '     ', ' \u00a0 nbsp\u00a0here', 'ideographic\u3000space',
    'thin\u2009space and em\u2003space', 'line\u2028sep para\u2029sep', 'nel\u0085here',
    'zero\u200bwidth', 'bom\ufeffhere',
    // CJK, Arabic, Hindi and other scripts
    '日本語のテキスト', '中文分词测试，这是一个句子。', '한국어 텍스트입니다', 'ひらがなとカタカナ',
    'مرحبا بالعالم', 'النص العربي مع أرقام ١٢٣', 'नमस्ते दुनिया', 'हिन्दी में लिखा गया वाक्य।',
    'Привет, мир!', 'Γειά σου Κόσμε', 'שלום עולם', 'สวัสดีชาวโลก', 'Xin chào thế giới',
    'Türkçe İstanbul ıIiİ', 'Straße ẞ', 'ǅemal ǈ ǋ', 'ﬁ ﬂ ﬀ ligatures',
    // emoji sequences
    'emoji 🙂👍🏽', '👨‍👩‍👧‍👦 family', '🏳️‍🌈 flag', '🇺🇸🇯🇵 flags', '❤️ ❤ ♥', '1️⃣ #️⃣', '👩🏿‍💻',
    '🙂🙂🙂🙂🙂', '😀a😀b', '𝕳𝖊𝖑𝖑𝖔 math', '𝟘𝟙𝟚', '🀄🃏',
    // combining marks (NFC / NFD differences)
    'naïve café, Zürich — «quotes»', 'nai\u0308ve cafe\u0301', '\u0301starts with combining',
    'e\u0301\u0301 double', 'a\u0328\u0301 ordered', 'a\u0301\u0328 unordered', 'Å vs A\u030a vs \u212b',
    '\u1e9b\u0323', 'ḱṷṓn', 'Ω \u2126 ohm', 'K \u212a kelvin', '한\u1100\u1161\u11a8 jamo',
    '\u0915\u093c nukta', 'ﬃ', '\u0340\u0341', 'x\u0345', '\u0f73\u0f75', 'Ǆ ǆ Ǳ',
    // special-token look-alikes
    '<s>', '</s>', '<unk>', '<s> literal special </s>', '<s>Hello', 'Hello</s>', '<s><s></s>',
    ' <s> ', '<s >', '< s>', '<<s>>', '<|begin_of_text|>', '<|begin_of_text|>Hi',
    '<|end_of_text|>', '<|eot_id|>x', '<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>',
    '<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n', '<|im_star', '<|endoftext|>',
    '<|endoftext|> after', 'before<|endoftext|>', '<bos>', '<eos>', '<start_of_turn>user\nhi<end_of_turn>',
    '<pad>', '<mask>', '<unused0>', '<0x41>', '<0x00>', '▁', '▁▁', '▁Hello', 'Ġ', 'Ċ', 'ĠHello',
    '<\uff5cbegin\u2581of\u2581sentence\uff5c>', '<\uff5cUser\uff5c>hi<\uff5cAssistant\uff5c>',
    '<think>\nreasoning\n</think>', '<tool_call>', '[INST] hi [/INST]', '<|user|>\nhi<|end|>',
    '<|assistant|>', '<|system|>', '<|placeholder1|>', '</s></s>', '<s>\n', '\n<s>',
    // NUL and control bytes
    'abc\u0000def', '\u0000', '\u0000\u0000', 'a\u0000', '\u0000b', 'tab\u0009bell\u0007esc\u001b[0m',
    '\u0001\u0002\u0003\u001f\u007f', 'del\u007fc1\u0080\u009f', 'form\u000cfeed\u000bvt',
    // misc punctuation and symbols
    '...', '!!!', '???', '---', '___', '***', '~~~', '...!?', '—–-', '…', '•·', '© ® ™', '€£¥₹',
    '→ ← ↑ ↓', '∑∏∫√∞≠≤≥', '«»‹›', '¿¡', '#hashtag @mention', 'C++ C# F#', 'a.b.c', 'a/b\\c',
    'İstanbul', 'ΣΊΣΥΦΟΣ', 'ǰ', 'ß', 'ŉ', 'ﬅ', 'ΐ',
];

function longWords() {
    const r = rng(7);
    let rand = '';
    for (let i = 0; i < 5000; i++) {
        rand += String.fromCharCode(97 + Math.floor(r() * 26));
    }
    return [
        'a'.repeat(5000), 'supercalifragilistic'.repeat(250), rand, ' '.repeat(5000),
        '\n'.repeat(5000), '1'.repeat(5000), 'é'.repeat(5000), '中'.repeat(5000),
        '🙂'.repeat(2500), 'ab'.repeat(2500) + ' end', 'e\u0301'.repeat(2500),
    ];
}

// Code point ranges the random strings draw from (no surrogates).
const RANGES = [
    [0x20, 0x7e, 8], [0x00, 0x1f, 1], [0x7f, 0x9f, 1], [0xa0, 0xff, 2], [0x100, 0x24f, 2],
    [0x300, 0x36f, 3], [0x370, 0x3ff, 1], [0x400, 0x4ff, 1], [0x590, 0x5ff, 1], [0x600, 0x6ff, 2],
    [0x900, 0x97f, 2], [0xe00, 0xe7f, 1], [0x1100, 0x11ff, 1], [0x1e00, 0x1eff, 1],
    [0x2000, 0x206f, 2], [0x20a0, 0x20cf, 1], [0x2100, 0x218f, 1], [0x2460, 0x24ff, 1],
    [0x3000, 0x30ff, 2], [0x4e00, 0x9fff, 3], [0xac00, 0xd7a3, 2], [0xe000, 0xe0ff, 1],
    [0xf900, 0xfaff, 1], [0xfb00, 0xfb4f, 1], [0xfe00, 0xfe0f, 1], [0xff00, 0xffef, 2],
    [0x1d400, 0x1d7ff, 1], [0x1f300, 0x1faff, 3], [0x1f1e6, 0x1f1ff, 1], [0x20000, 0x2a6df, 1],
    [0x200d, 0x200d, 2], [0x20, 0x20, 4], [0x0a, 0x0a, 1], [0x378, 0x379, 1], [0xe0100, 0xe01ef, 1],
];

function randomStrings(n, seed) {
    const r = rng(seed);
    let total = 0;
    for (const x of RANGES) {
        total += x[2];
    }
    const out = [];
    for (let k = 0; k < n; k++) {
        const len = 1 + Math.floor(r() * 40);
        let s = '';
        for (let i = 0; i < len; i++) {
            let w = r() * total;
            let g = RANGES[0];
            for (const x of RANGES) {
                if ((w -= x[2]) < 0) {
                    g = x;
                    break;
                }
            }
            s += String.fromCodePoint(g[0] + Math.floor(r() * (g[1] - g[0] + 1)));
        }
        out.push(s);
    }
    return out;
}

function testSet() {
    const words = ['the', 'The', 'THE', 'cat', 'Zebra', "don't", '42', '3.5', 'naïve', '日本',
                   '🙂', '<s>', '  ', '\n', '\t', ',', '.', 'x\u0301', 'İ'];
    const r = rng(12345);
    const mixed = [];
    for (let k = 0; k < 40; k++) {
        let s = '';
        const n = 2 + Math.floor(r() * 12);
        for (let i = 0; i < n; i++) {
            s += words[Math.floor(r() * words.length)] + (r() < 0.6 ? ' ' : '');
        }
        mixed.push(s);
    }
    return [...fixed, ...longWords(), ...mixed, ...randomStrings(150, 2024)];
}

module.exports = { testSet, rng };

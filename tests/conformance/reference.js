// Reference ids and decodes from the official Hugging Face tokenizers library (npm `tokenizers`,
// the Rust library's Node binding) for the conformance test set (cases.js), for every tokenizer
// folder named on the command line. Writes one JSON file per tokenizer, texts as hex (they hold
// NUL bytes): {"name", "cases": [{"hex", "ids", "ids_special", "dec_hex", "dec_skip_hex"}]}.
// Usage: node reference.js OUT_DIR NAME=DIR [NAME=DIR ...]
'use strict';
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('tokenizers');
const { testSet } = require('./cases.js');

const hex = (s) => Buffer.from(s, 'utf8').toString('hex');

async function main() {
    const [outDir, ...specs] = process.argv.slice(2);
    const texts = testSet();
    fs.mkdirSync(outDir, { recursive: true });
    for (const spec of specs) {
        const [name, dir] = spec.split('=');
        const tok = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));
        const cases = [];
        for (const t of texts) {
            const plain = await tok.encode(t, null, { addSpecialTokens: false });
            const special = await tok.encode(t, null, { addSpecialTokens: true });
            const ids = Array.from(plain.getIds());
            const idsSpecial = Array.from(special.getIds());
            cases.push({
                hex: hex(t),
                ids,
                ids_special: idsSpecial,
                dec_hex: hex(await tok.decode(idsSpecial, false)),
                dec_skip_hex: hex(await tok.decode(idsSpecial, true)),
            });
        }
        fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify({ name, cases }));
        console.log(`reference: ${name}: ${cases.length} strings`);
    }
}

main().catch((e) => {
    console.error(e);
    process.exit(1);
});

// Perplexity of a GGUF under llama.cpp (node-llama-cpp), scoring each
// sequence from position 0 as mxq eval does: exp(mean over sequences and
// positions t of -log p(token t+1 | tokens 0..t)).
//   node ppl.mjs MODEL.gguf TOKENS.bin SEQ_LEN N_SEQS
// TOKENS.bin: int32 little-endian [N_SEQS, SEQ_LEN] (h5dump -b LE of /tokens).
import { readFileSync } from "node:fs";
import { getLlama } from "node-llama-cpp";

const [modelPath, tokensPath, seqLenText, nSeqsText] = process.argv.slice(2);
const seqLen = Number(seqLenText), nSeqs = Number(nSeqsText);
const raw = readFileSync(tokensPath);
const ids = new Int32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
if (ids.length < seqLen * nSeqs) throw new Error(`${tokensPath}: ${ids.length} ids, fewer than ${nSeqs} x ${seqLen}`);

const llama = await getLlama({ gpu: false, logLevel: "error" });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const context = await model.createContext({ contextSize: seqLen, batchSize: seqLen, threads: 1 });
const sequence = context.getSequence();
let nll = 0, scored = 0;
for (let s = 0; s < nSeqs; s++) {
  const tokens = Array.from(ids.subarray(s * seqLen, (s + 1) * seqLen));
  await sequence.clearHistory();
  const input = tokens.slice(0, seqLen - 1).map((t) => [t, { generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } } }]);
  const out = await sequence.controlledEvaluate(input);
  for (let t = 0; t < seqLen - 1; t++) {
    const p = out[t]?.next?.probabilities?.get(tokens[t + 1]);
    if (p === undefined || !(p > 0)) throw new Error(`sequence ${s}, position ${t}: no probability for token ${tokens[t + 1]}`);
    nll -= Math.log(p);
    scored++;
  }
}
console.log(`perplexity ${Math.exp(nll / scored).toFixed(6)} mean_nll ${(nll / scored).toFixed(9)} tokens_scored ${scored}`);
await context.dispose();
await model.dispose();

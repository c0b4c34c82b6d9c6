#!/usr/bin/env python3
"""llama.cpp side of benches/cpu_models.rs, through llama-cpp-python (the bench pins the version).

Loads one GGUF, prints {"ready": ...} and then serves one JSON line per request on stdin,
{"prompt": str, "max_tokens": n}, with one JSON line on stdout: the prompt is tokenized by the GGUF's
own tokenizer and evaluated from an empty KV cache (prefill: prompt tokens / wall time of that eval,
which ends with the last token's logits), then n tokens are chosen greedily (argmax), the first from
the prefill's logits and each next one after a one-token eval (decode: (n - 1) evals / their wall
time; EOS does not stop it). llama.cpp's own perf counters for the same run come back too.
"""
import argparse
import json
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--flash-attn", type=int, default=1)
    args = ap.parse_args()
    llm = Llama(
        model_path=args.model,
        n_ctx=args.ctx,
        n_batch=args.batch,
        n_ubatch=args.batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=bool(args.flash_attn),
        seed=0,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    ctx = llm._ctx

    def greedy():
        logits = np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(np.argmax(logits))

    print(json.dumps({"ready": True, "llama_cpp_python": llama_cpp.__version__, "n_ctx": llm.n_ctx()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        tokens = llm.tokenize(req["prompt"].encode("utf-8"), add_bos=True, special=False)
        n_new = int(req["max_tokens"])
        # A fresh context for every run: nothing from the previous prompt may be reused.
        llm.reset()
        ctx.kv_cache_clear()
        llama_cpp.llama_perf_context_reset(ctx.ctx)
        t0 = time.perf_counter()
        llm.eval(tokens)
        token = greedy()
        t1 = time.perf_counter()
        generated = [token]
        for _ in range(n_new - 1):
            llm.eval([token])
            token = greedy()
            generated.append(token)
        t2 = time.perf_counter()
        perf = llama_cpp.llama_perf_context(ctx.ctx)
        print(
            json.dumps(
                {
                    "prompt_tokens": len(tokens),
                    "completion_tokens": len(generated),
                    "prefill_tok_s": len(tokens) / (t1 - t0),
                    "decode_tok_s": (n_new - 1) / (t2 - t1) if n_new > 1 else None,
                    "perf_prefill_tok_s": perf.n_p_eval / perf.t_p_eval_ms * 1e3 if perf.t_p_eval_ms > 0 else None,
                    "perf_decode_tok_s": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms > 0 else None,
                    "text": llm.detokenize(generated).decode("utf-8", "replace"),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""End-to-end decode throughput of `mistralrs-server --kv-policy full|quest|retro` on the GPU
machine (issue 6, item 4). Runs there, from the repository root, with gpu-dist/ carried over.

1. `gen`: random bf16 weights in the Llama-3.1-8B shape (32 layers, 4096 hidden, 14336 MLP, 32 query /
   8 KV heads of 128) generated with torch on the GPU, written as safetensors with a config.json and
   the embedded SmolLM2 tokenizer (so the vocabulary is SmolLM2's 49152 tokens, not Llama's 128256:
   the LM head is 0.4 GB instead of 1.05 GB of the 16 GB of weights).
2. `run`: for each policy, start the server, and for each context and batch send `batch` streaming
   completions whose prompts are `context` tokens (distinct per request, so no prefix-cache hits),
   wait until every stream has produced its first token, then count the tokens all streams deliver
   in a fixed window: aggregate decode tokens/s. Streams are closed after the window.
3. `sanity`: the real SmolLM2 GGUF under the three policies (budget above the context) with greedy
   decoding: the texts must be equal to each other (and are printed for comparison with the CPU build).

Results: one JSON line per measurement in $OUT/e2e.jsonl, a table on stdout.
"""
import argparse, http.client, json, os, random, re, shutil, subprocess, sys, threading, time

OUT = os.environ.get("OUT", "gpu-out")


def file_label(text):
    """A file-name-safe label (the device transfer drops names with '=' and other odd characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def policy_spec(spec):
    """`retro:--kv-window=2` -> ("retro", ["--kv-window=2"], ["--kv-window", "2"]): the policy, its
    extra flags as written, and as server arguments."""
    name, *extra = spec.split(":")
    return name, extra, [f for e in extra for f in e.split("=", 1)]


def ask_once(binary, flags, port, log, path, body, metrics=None):
    """Start a server, send one request, stop it; the parsed JSON answer (and /metrics to `metrics`)."""
    srv = Server(binary, flags, port, log)
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = json.loads(c.getresponse().read())
        if metrics:
            open(metrics, "w").write(srv.metrics())
        return answer
    finally:
        srv.stop()


def gen(model_dir, layers):
    import torch
    from safetensors.torch import save_file
    os.makedirs(model_dir, exist_ok=True)
    shutil.copy("gpu-dist/tokenizer.json", model_dir)
    if os.path.exists(os.path.join(model_dir, "done")):
        return
    h, inter, heads, kv, hd, vocab = 4096, 14336, 32, 8, 128, 49152
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    json.dump(cfg, open(os.path.join(model_dir, "config.json"), "w"), indent=1)
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    index = {}
    t0 = time.time()
    for shard in range(layers + 1):
        t = {}
        if shard == layers:
            t["model.embed_tokens.weight"] = rnd(vocab, h)
            t["lm_head.weight"] = rnd(vocab, h)
            t["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        else:
            p = f"model.layers.{shard}."
            t[p + "self_attn.q_proj.weight"] = rnd(heads * hd, h)
            t[p + "self_attn.k_proj.weight"] = rnd(kv * hd, h)
            t[p + "self_attn.v_proj.weight"] = rnd(kv * hd, h)
            t[p + "self_attn.o_proj.weight"] = rnd(h, heads * hd)
            t[p + "mlp.gate_proj.weight"] = rnd(inter, h)
            t[p + "mlp.up_proj.weight"] = rnd(inter, h)
            t[p + "mlp.down_proj.weight"] = rnd(h, inter)
            t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        name = f"model-{shard + 1:05d}-of-{layers + 1:05d}.safetensors"  # the names mistral.rs looks for
        save_file(t, os.path.join(model_dir, name), metadata={"format": "pt"})
        index.update({k: name for k in t})
    json.dump({"metadata": {}, "weight_map": index}, open(os.path.join(model_dir, "model.safetensors.index.json"), "w"))
    open(os.path.join(model_dir, "done"), "w").write("ok")
    print(f"gen: {layers} layers in {time.time() - t0:.0f} s", flush=True)


class Server:
    def __init__(self, binary, args, port, log):
        self.port = port
        self.log = open(log, "w")
        self.proc = subprocess.Popen([binary, "--port", str(port)] + args, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() - t0 > 600:
                raise RuntimeError("server did not come up in 600 s")
            time.sleep(1)
        self.load_s = time.time() - t0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()


def stream(port, prompt, max_tokens, times, stop, result):
    """One streaming completion; appends the arrival time of every content chunk to `times`."""
    body = json.dumps({"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1200)
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            result["error"] = f"HTTP {r.status}: {r.read()[:300]!r}"
            return
        text = []
        for line in r:
            if stop.is_set():
                break
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            try:
                ev = json.loads(line[5:])
            except ValueError:  # upstream streams an engine error as plain text
                result["error"] = f"stream event is not JSON: {line[:500]!r}"
                return
            for ch in ev.get("choices", []):
                if ch.get("text"):
                    times.append(time.time())
                    text.append(ch["text"])
        result["text"] = "".join(text)
        c.close()
    except Exception as e:  # noqa: BLE001 - reported in the results
        result["error"] = repr(e)


def words_prompt(n_tokens, seed, tokenizer):
    """A prompt of exactly n_tokens tokens of random common words (checked with the tokenizer)."""
    rng = random.Random(seed)
    vocab = [w for w in (" the", " cat", " sat", " on", " a", " mat", " and", " dog", " ran", " to", " big",
                         " red", " house", " in", " old", " town", " of", " green", " tree", " by", " river")]
    text = "".join(rng.choice(vocab) for _ in range(n_tokens))
    if tokenizer is None:  # each of these words is one SmolLM2 token
        return text
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.decode(ids[:n_tokens])


def measure(port, prompts, window_s, max_tokens, stagger_s=0.2):
    stop = threading.Event()
    times = [[] for _ in prompts]
    results = [{} for _ in prompts]
    threads = []
    t0 = time.time()
    for i, p in enumerate(prompts):
        th = threading.Thread(target=stream, args=(port, p, max_tokens, times[i], stop, results[i]), daemon=True)
        th.start()
        threads.append(th)
        # Staggered: requests arrive one after another and prefill one at a time, as a server sees
        # them, so the streams decode at different lengths. --together (stagger 0): equal-length
        # prompts sent at once stay in lockstep, which upstream's length-bucketed scheduler needs to
        # batch `full`'s decode at all.
        time.sleep(stagger_s)
    while any(len(t) == 0 for t in times):
        if any("error" in r for r in results) or all(not th.is_alive() for th in threads):
            break
        time.sleep(0.05)
    t_all = time.time()
    time.sleep(1.0)  # let the batch settle into pure decode steps
    start = time.time()
    n0 = sum(len(t) for t in times)
    time.sleep(window_s)
    n1 = sum(len(t) for t in times)
    end = time.time()
    finished = sum(1 for th in threads if not th.is_alive())
    stop.set()
    errors = [r["error"] for r in results if "error" in r]
    return {"tok_s": (n1 - n0) / (end - start), "tokens": n1 - n0, "window_s": end - start,
            "prefill_s": t_all - t0, "finished_early": finished, "errors": errors}


def run(args):
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    except ImportError:
        tok = None
    rows = []
    jsonl = open(os.path.join(OUT, "e2e.jsonl"), "a")
    for policy in args.policies:
        name, extra, extra_flags = policy_spec(policy)
        flags = ["--model", args.model, "--dtype", "bf16", "--kv-policy", name, "--max-seqs", str(max(args.batches)),
                 "--pa-context-len", str(args.kv_tokens), "--max-seq-len", str(max(args.contexts) + 4096)]
        # A spec may carry its own budget (`quest:--kv-budget-ratio=0.1`); otherwise --budget tokens.
        own_budget = any(e.startswith("--kv-budget") for e in extra)
        flags += [] if name == "full" or own_budget else ["--kv-budget-tokens", str(args.budget)]
        flags += extra_flags
        label = name + ("" if not extra else " " + " ".join(extra))
        model = os.path.basename(os.path.normpath(args.model))
        srv = Server(args.binary, flags, args.port, os.path.join(OUT, f"server-{model}-{file_label(label)}.log"))
        print(f"{label}: server up in {srv.load_s:.0f} s", flush=True)
        try:
            for ctx in args.contexts:
                for b in args.batches:
                    prompts = [words_prompt(ctx, 1000 * ctx + i, tok) for i in range(b)]
                    m = measure(args.port, prompts, args.window, args.max_tokens, 0.0 if args.together else 0.2)
                    spec = dict(e.split("=", 1) for e in extra if "=" in e)
                    ratio = spec.get("--kv-budget-ratio")
                    rec = {"kind": "e2e", "model": model, "policy": name, "context": ctx, "batch": b,
                           "budget": None if ratio or name == "full" else args.budget,
                           "budget_ratio": float(ratio) if ratio else None,
                           "window": int(spec.get("--kv-window", 2 if name == "retro" else 1)),
                           "flags": extra,
                           "ms": 1e3 * b / m["tok_s"] if m["tok_s"] else None, "gbps": None, "tok_s": m["tok_s"],
                           "prefill_s": m["prefill_s"], "together": args.together,
                           "prompt_attention": spec.get("--prompt-attention", "auto"), "errors": m["errors"], "finished_early": m["finished_early"]}
                    rows.append(rec)
                    jsonl.write(json.dumps(rec) + "\n")
                    jsonl.flush()
                    print(f"{label:>14} ctx {ctx:>6} batch {b:>2}: {m['tok_s']:8.1f} tok/s ({m['tokens']} tokens in "
                          f"{m['window_s']:.1f} s; prefills {m['prefill_s']:.0f} s){' ERR ' + str(m['errors']) if m['errors'] else ''}",
                          flush=True)
            open(os.path.join(OUT, f"metrics-{model}-{file_label(label)}.txt"), "w").write(srv.metrics())
        finally:
            srv.stop()
    full = {(r["context"], r["batch"]): r["tok_s"] for r in rows if r["policy"] == "full"}
    print("\n| policy | context | batch | tok/s | vs full |\n|---|---|---|---|---|")
    for r in rows:
        base = full.get((r["context"], r["batch"]))
        ratio = f"{r['tok_s'] / base:.2f}" if base and r["tok_s"] else "-"
        print(f"| {r['policy']} w={r['window']} | {r['context']} | {r['batch']} | {r['tok_s']:.1f} | {ratio} |")


def sanity(args):
    texts = {}
    prompt = "Explain in a few sentences why the sky is blue, then list three colours."
    # Budget above the context first (must equal full), then 64 tokens (2 pages: the sparse path runs).
    for policy, budget in [("full", None), ("quest", 100000), ("retro", 100000), ("quest", 64), ("retro", 64)]:
        # f32 as the CPU build runs it: bf16 rounding would let two correct kernels drift apart.
        flags = ["--model", args.gguf, "--dtype", "f32", "--kv-policy", policy, "--max-seqs", "4", "--pa-block-size", "32"]
        flags += [] if budget is None else ["--kv-budget-tokens", str(budget)]
        key = policy if budget in (None, 100000) else f"{policy} budget {budget}"
        body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 96, "temperature": 0}
        r = ask_once(args.binary, flags, args.port, os.path.join(OUT, f"sanity-{file_label(key)}.log"), "/v1/chat/completions",
                     body, metrics=os.path.join(OUT, f"sanity-metrics-{file_label(key)}.txt"))
        texts[key] = r["choices"][0]["message"]["content"] if "choices" in r else f"ERROR {r}"
        texts[key + " usage"] = r.get("usage")
        print(f"sanity {key}: {texts[key]!r}", flush=True)
    json.dump(texts, open(os.path.join(OUT, "sanity.json"), "w"), indent=1)
    same = texts["full"] == texts["quest"] == texts["retro"]
    print(f"sanity: full == quest == retro (budget above context): {same}")
    if args.reference and os.path.exists(args.reference):
        # The CPU build's texts for the same requests (`e2e.py sanity` run there).
        ref = json.load(open(args.reference))
        for key, text in texts.items():
            if isinstance(text, str) and isinstance(ref.get(key), str):
                agree = next((i for i, (a, b) in enumerate(zip(text, ref[key])) if a != b), min(len(text), len(ref[key])))
                equal = text == ref[key]
                same = same and (equal or "budget" in key)
                print(f"sanity {key}: {'equal to' if equal else 'differs from'} the CPU build's text (first {agree} characters agree)")
    return same


def compare(args):
    """Greedy texts of one prompt under several policies on one model (random weights are fine: any
    difference at a budget above the context is a bug). Prints each text and whether it equals the first."""
    texts = []
    prompt = words_prompt(args.contexts[0], 7, None)
    for i, policy in enumerate(args.policies):
        name, _, extra_flags = policy_spec(policy)
        flags = ["--model", args.model, "--dtype", args.dtype, "--kv-policy", name, "--max-seqs", "4"] + extra_flags
        body = {"model": "default", "prompt": prompt, "max_tokens": 24, "temperature": 0}
        tag = file_label(policy)
        r = ask_once(args.binary, flags, args.port + i, os.path.join(OUT, f"compare-{tag}.log"), "/v1/completions", body,
                     metrics=os.path.join(OUT, f"compare-metrics-{tag}.txt"))
        texts.append(r["choices"][0]["text"] if "choices" in r else f"ERROR {r}")
        print(f"compare {policy}: {'same as first' if texts[-1] == texts[0] else 'DIFFERS'}: {texts[-1]!r}", flush=True)
    return all(t == texts[0] for t in texts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["gen", "run", "sanity", "compare"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--binary", default="gpu-bin/mistralrs-server")
    ap.add_argument("--model", default="gpu-work/llama8b-random")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--gguf", default="gpu-work/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--reference", default="gpu-dist/sanity-cpu.json", help="the CPU build's sanity.json")
    ap.add_argument("--policies", nargs="+", default=["full", "quest", "retro:--kv-window=2"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--kv-tokens", type=int, default=8 * 33792)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=4000)
    ap.add_argument("--port", type=int, default=18123)
    ap.add_argument("--together", action="store_true", help="send a batch's requests at once, not 0.2 s apart")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.what == "gen":
        gen(args.model, args.layers)
    elif args.what == "run":
        run(args)
    elif args.what == "compare":
        sys.exit(0 if compare(args) else 1)
    else:
        sys.exit(0 if sanity(args) else 1)


if __name__ == "__main__":
    main()

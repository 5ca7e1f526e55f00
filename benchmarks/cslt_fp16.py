"""float16 through cuSPARSELt on this GPU: which calls work, which fail, and how (each in its own process).

Every attempt runs in a fresh Python process, so an attempt that kills its process (illegal
instruction, a CUDA error that poisons the context) does not stop the others. bfloat16 controls run
the same calls. Writes one JSON with each attempt's exit status, result check and error text:

    python benchmarks/cslt_fp16.py --out benchmarks/results/cslt_fp16_h200.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SETUP = """
import json, torch, torch.nn.functional as F
torch.manual_seed(0)
dt = getattr(torch, DTYPE)
w = torch.randn(OUT, IN, device="cuda", dtype=dt)
keep = w.abs().reshape(OUT, IN // 4, 4).topk(2, dim=-1).indices
w = torch.zeros_like(w).reshape(OUT, IN // 4, 4).scatter(-1, keep, w.reshape(OUT, IN // 4, 4).gather(-1, keep)).reshape(OUT, IN)
x = torch.randn(TOKENS, IN, device="cuda", dtype=dt)
ref = x.float() @ w.float().t()
p = torch._cslt_compress(w)
torch.cuda.synchronize()
def check(y, tag=""):
    torch.cuda.synchronize()
    y = y.float()
    if y.shape != ref.shape:
        y = y.t()
    err = float((y - ref).abs().max() / ref.abs().max())
    return {"shape": list(y.shape), "max_rel_err": err, "ok": err < 2e-2}
"""

ATTEMPTS = {
    "mm alg 0, transpose_result=True, B = x^T view (the llmprune call)":
        "r = check(torch._cslt_sparse_mm(p, x.t(), transpose_result=True))",
    "mm alg 0, transpose_result=False, B = x^T view":
        "r = check(torch._cslt_sparse_mm(p, x.t(), transpose_result=False))",
    "mm alg 0, transpose_result=False, B = x^T contiguous":
        "r = check(torch._cslt_sparse_mm(p, x.t().contiguous(), transpose_result=False))",
    "mm alg 0, transpose_result=True, B = x^T contiguous":
        "r = check(torch._cslt_sparse_mm(p, x.t().contiguous(), transpose_result=True))",
    "mm alg 0, out_dtype=float32":
        "r = check(torch._cslt_sparse_mm(p, x.t(), out_dtype=torch.float32, transpose_result=True))",
    "mm alg 0 with bias":
        "r = check(torch._cslt_sparse_mm(p, x.t(), torch.zeros(OUT, device='cuda', dtype=dt), transpose_result=True))",
    "legacy search torch._cslt_sparse_mm_search, then mm":
        "a = int(torch._cslt_sparse_mm_search(p, x.t(), transpose_result=True))\n"
        "r = {'alg': a, **check(torch._cslt_sparse_mm(p, x.t(), transpose_result=True, alg_id=a))}",
    "torch._C._cusparselt.mm_search, then mm with its alg/split_k":
        "a, k, m, mx = torch._C._cusparselt.mm_search(p, x.t(), None, None, None, True)\n"
        "y = torch._cslt_sparse_mm(p, x.t(), transpose_result=True, alg_id=a, split_k=k, split_k_mode=m)\n"
        "r = {'alg': a, 'split_k': k, 'split_k_mode': m, 'max_alg_id': mx, **check(y)}",
    "torch._C._cusparselt.mm_search, transpose_result=False, contiguous B":
        "b = x.t().contiguous()\n"
        "a, k, m, mx = torch._C._cusparselt.mm_search(p, b, None, None, None, False)\n"
        "y = torch._cslt_sparse_mm(p, b, transpose_result=False, alg_id=a, split_k=k, split_k_mode=m)\n"
        "r = {'alg': a, 'split_k': k, 'split_k_mode': m, **check(y)}",
    "alg ids 0..63 without search (transpose_result=True)":
        "import torch.backends.cusparselt as cs\n"
        "r = {'version': cs.version(), 'algs': {}}\n"
        "for a in range(64):\n"
        "    try:\n"
        "        r['algs'][a] = check(torch._cslt_sparse_mm(p, x.t(), transpose_result=True, alg_id=a))['ok']\n"
        "    except RuntimeError as e:\n"
        "        r['algs'][a] = str(e).splitlines()[0][:160]",
    "stock to_sparse_semi_structured + F.linear":
        "from torch.sparse import to_sparse_semi_structured\n"
        "r = check(F.linear(x, to_sparse_semi_structured(w)))",
}


def attempt(code: str, dtype: str, tokens: int, out: int, inp: int, timeout: int) -> dict:
    src = (SETUP.replace("DTYPE", repr(dtype)).replace("TOKENS", str(tokens)).replace("OUT", str(out))
           .replace("IN", str(inp)) + code.replace("OUT", str(out)) + "\nprint('RESULT ' + json.dumps(r))\n")
    try:
        p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "error": f"timed out after {timeout} s"}
    res = {"returncode": p.returncode}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        res["result"] = json.loads(lines[-1][7:])
    if p.returncode != 0 or not lines:
        err = [ln for ln in p.stderr.splitlines() if ln.strip()]
        res["error"] = "\n".join(err[-6:])
    warn = [ln.strip() for ln in p.stderr.splitlines() if "Warning" in ln or "warn" in ln]
    if warn:
        res["warnings"] = warn[:3]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default="16,2048")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--parallel", type=int, default=4, help="attempts running at once (each its own process)")
    a = ap.parse_args()
    import torch

    result = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "shape": [4096, 4096], "attempts": []}
    try:
        import torch.backends.cusparselt as cs
        result["cusparselt"] = cs.version()
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        result["cusparselt"] = repr(exc)
    jobs = [(dtype, tokens, name) for dtype in ("float16", "bfloat16") for tokens in [int(t) for t in a.tokens.split(",")]
            for name in ATTEMPTS if not (dtype == "bfloat16" and name.startswith("alg ids"))]
    with ThreadPoolExecutor(a.parallel) as pool:  # separate processes; the GPU work of each is milliseconds
        runs = pool.map(lambda j: attempt(textwrap.dedent(ATTEMPTS[j[2]]), j[0], j[1], 4096, 4096, a.timeout), jobs)
        for (dtype, tokens, name), r in zip(jobs, runs):
            r = {"dtype": dtype, "tokens": tokens, "attempt": name, **r}
            print(json.dumps(r), flush=True)
            result["attempts"].append(r)
            a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

import json, subprocess, tempfile, triton, os, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tests.cpu import sm90_compile as s
bin_ = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
def res(fn, sig, ce, nw=4):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        r = subprocess.run([bin_, "-res-usage", f.name], capture_output=True, text=True).stdout
    return [l.strip() for l in r.splitlines() if "REG" in l][0][:30]
for fn, args, kw in s.launches():
    if fn.__name__ != "_paged_decode" or kw["SPLITS"] != 1 or kw["IEEE"]: continue
    sig, ce = s._signature(fn, args, kw)
    for nw in (4, 8):
        print(kw["D"], kw["G"], "warps", nw, res(fn, sig, ce, nw))

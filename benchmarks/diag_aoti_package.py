import sys, torch, faulthandler, json
faulthandler.enable()
from slimfx.measure.shapes import build
from slimfx.export.build import export_package
from slimfx.export.package import load_package
from slimfx.runtime.generate import generate
mode = sys.argv[1]
model = build("tiny", torch.bfloat16, "cuda")
ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(0)).cuda()
if mode == "export":
    export_package(model, "/tmp/diagpkg", batch=1, capacity=128, chunk=16, overwrite=True, compile="aoti")
    print(json.load(open("/tmp/diagpkg/manifest.json"))["programs"][0].get("runner"), flush=True)
else:
    pkg = load_package("/tmp/diagpkg")
    print("loaded", pkg.load_times, flush=True)
    out = pkg.generate(ids, max_new_tokens=8, cuda_graph=(mode == "graph"))
    print(mode, "ok", out.tokens.tolist(), flush=True)

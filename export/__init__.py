"""Ahead-of-time export: `slimfx export` writes a package that generates without compiling.

    build.py     run the passes once, export the prefill-chunk and decode-step graphs
    manifest.py  what a package holds, verified before anything is loaded
    package.py   load a package and generate with it (slimfx.load_package)
"""

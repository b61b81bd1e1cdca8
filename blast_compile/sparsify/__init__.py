"""``blast sparsify``: a pretrained causal LM + text -> a block-sparse model (BLaST), measured and saved.

    from blast_compile.sparsify import Options, run
    report = run(Options(model="SmolLM2-135M.gguf", data=["tokens.safetensors"], out="runs/s90", sparsity=0.9))

options.py (every knob, checks), data.py (model, text), run.py (the loop), checkpoint.py (resume),
report.py (perplexity, live blocks, MLP timing, curve).
"""
from .options import Options, SparsifyError, add_arguments, check, from_args
from .report import perplexity, plot_curves, render
from .run import distill_loss, run

__all__ = ["Options", "SparsifyError", "add_arguments", "check", "from_args", "perplexity", "plot_curves", "render",
           "distill_loss", "run"]

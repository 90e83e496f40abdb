"""Continual learning as Srivastava et al. (arXiv 2410.19925) define it: a language task, then vision-language
tasks learned one after another; the forgetting matrix, NL Δ, VL Avg, rehearsal and the mSGM preset.

spec.py (the continual recipe), rehearsal.py (replay samples as build sources), scores.py (matrix, Δ, report,
heatmap), run.py (the task loop and `mlan continual`), data.py (the generated tasks of continual-tiny).
"""

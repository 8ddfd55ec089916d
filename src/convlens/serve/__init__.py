"""`convlens serve`: a local web page to draw digits, explain photos, browse statistics and actmax images.

The computations live in :mod:`convlens.serve.logic` (plain functions, no Gradio); the page is built in
:mod:`convlens.serve.app`, which needs the optional extra ``convlens[serve]`` (Gradio).
"""


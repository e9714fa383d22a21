"""A local web page to look at what a checkpoint does: reconstructions beside their originals, generated and edited
images, answers of the tokenizer exported into InternVL, and a run's curves and validation grids while it trains.

    python -m unilip.demo runs/quickstart            # or: unilip-demo <run or checkpoint folder>...

Gradio comes with the optional extra (`pip install -e ".[demo]"`) and is imported only when the page is built:
nothing on the training path imports this package.
"""

"""distill: the pure-PyTorch core of distillery (data, nets, training, dataset formats).

Never imports prefect or ray, so every algorithm runs as a plain function, e.g. in a notebook.
"""

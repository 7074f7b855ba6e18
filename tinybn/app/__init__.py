"""The application built on the engine: Fashion-MNIST, the models of the chapter, the trainer, checkpoints,
the progress bar, the benchmark and the command line (``python -m tinybn``)."""

"""The torch-only core: data sources and datasets, models, and the train and evaluation loops.

Nothing here knows of params.yaml, artifact paths, MLflow, DVC or Prefect: functions take plain
arguments and return tensors, arrays and dicts, so the loop can be read, tested and reused by
itself. The steps in `tasks/` read files, call the core, write files and log. The only project
import allowed here is `tasks.errors`, a leaf module, so that a bad input gets the pipeline's
one-line error and exit code.

- `sources`: the raw data (scikit-learn digits, MNIST/FashionMNIST IDX files, an image folder)
  and decoding images once, with every bad file named and its reason given.
- `arrays`: the stratified split and the per-channel statistics, in numpy (prepare needs no torch).
- `data`: the memory-mapped `Dataset`, the epoch sampler, augmentation and the loaders.
- `models`: the architectures (cnn, mlp, torchvision's resnet18 and mobilenet_v3_small), loss
  and optimizer.
- `loops`: one epoch of training with the recipe (accumulation, mixed precision, clipping, the
  learning-rate schedule), validation, evaluation.
- `checkpoint`: saving, verifying and loading checkpoints, and the random generators' states.
- `distributed`: the process group under torchrun, and the few collective calls train needs.
"""

"""Paper studies behind ``prunekit reproduce NAME``: one module per paper, built on the public library API.

* :mod:`.merging` — Neuron Merging (``nm-*``): the LeNet-300-100 / Fashion-MNIST table from the official
  checkpoint, and the official CIFAR presets on a given checkpoint;
* :mod:`.polarization` — Polarization (``polarization-*``): baseline → polarized training → prune at the
  valley → fine-tune, against network slimming and l1-norm pruning; CPU and paper-sized;
* :mod:`.grda` — gRDA (``grda-*``): sparsity/accuracy grids against plain SGD and magnitude pruning;
* :mod:`.compensation` — compensation side by side (``compensation-*``): prune / merge / lstsq / reconstruct
  against Torch-Pruning with and without fine-tuning, and a calibration-size sweep;
* :mod:`.common` — what they share (option checks, output folder, headless figures).

This package sits above the library: it imports only public API (package exports such as
``prunekit.merging.merge``), and nothing outside it and the CLI imports it. The study registry
(:mod:`prunekit.reproduce`) names these modules as strings and imports them on its first lookup, so
``prunekit.reproduce.get_study("nm-lenet300-fmnist")`` works in a fresh interpreter. Importing this
package itself registers nothing.
"""

"""Federated datasets: loaders, the synthetic generator, partitions, pipeline.

`prepare` builds the paper's protocol end to end; the other names are its
parts (see each module's docstring for what it implements).
"""

from afl.data import files
from afl.data.partition import client_label_histograms
from afl.data.partition import dirichlet_partition
from afl.data.partition import iid_partition
from afl.data.partition import power_law_partition
from afl.data.partition import split_train_test
from afl.data.partition import summarize
from afl.data.pipeline import check_finite
from afl.data.pipeline import ClientSplit
from afl.data.pipeline import DATASETS
from afl.data.pipeline import PARTITIONS
from afl.data.pipeline import prepare
from afl.data.pipeline import preprocess
from afl.data.sources import ArrayDataset
from afl.data.sources import DataError
from afl.data.sources import load_cifar10
from afl.data.sources import load_dataset
from afl.data.sources import load_mnist
from afl.data.sources import load_tfds
from afl.data.sources import resolve_data_dir
from afl.data.synthetic import synthetic

__all__ = [
    "ArrayDataset",
    "ClientSplit",
    "DATASETS",
    "DataError",
    "PARTITIONS",
    "check_finite",
    "client_label_histograms",
    "dirichlet_partition",
    "files",
    "iid_partition",
    "load_cifar10",
    "load_dataset",
    "load_mnist",
    "load_tfds",
    "power_law_partition",
    "prepare",
    "preprocess",
    "resolve_data_dir",
    "split_train_test",
    "summarize",
    "synthetic",
]

"""The batches of the full gradient, read without disturbing the user's own pass over the same loader."""
import warnings
import weakref

import torch
from torch.utils.data import DataLoader, IterableDataset

from .errors import SmallBatchWarning


def full_gradient_batches(data_loader):
    """An iterable over ``data_loader``'s batches for the recenter's pass.

    A ``DataLoader`` with ``persistent_workers=True`` hands out one shared
    iterator: ``iter(loader)`` inside the user's ``for x, y in loader`` would
    restart it and cut the user's epoch short. Such a loader is read through a
    twin built from the same dataset, sampler and settings, with workers of its
    own. Anything else is iterated as it is.
    """
    if not (isinstance(data_loader, DataLoader) and data_loader.persistent_workers):
        return data_loader
    if data_loader not in _TWINS:
        _TWINS[data_loader] = _twin(data_loader)
    return _TWINS[data_loader]


_TWINS = weakref.WeakKeyDictionary()


def _twin(loader):
    settings = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                    timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                    multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                    prefetch_factor=loader.prefetch_factor, persistent_workers=True)
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **settings)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **settings)
    return DataLoader(loader.dataset, sampler=loader.sampler, batch_size=None, **settings)


def warn_small_batch(examples, first, stacklevel):
    """:class:`SmallBatchWarning` for a batch of ``examples`` after a first batch of ``first``; ``stacklevel``
    counts from the caller of this function."""
    warnings.warn(f"a batch of {examples} examples, against {first} in the first: the model has batch-norm layers, "
                  "whose statistics on so few examples make the gradients at the weights and at the anchor "
                  "disagree, and SVRG/HALP can collapse. Pass drop_last=True to the DataLoader",
                  SmallBatchWarning, stacklevel=stacklevel + 1)


def has_batch_norm(module):
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())

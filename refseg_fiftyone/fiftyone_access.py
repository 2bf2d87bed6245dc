"""The only places where refseg reaches past FiftyOne's public API.

Everything else in :mod:`refseg_fiftyone` and the operators uses FiftyOne's
documented interface (collections, samples, ``dataset.info``, operators). The
functions here rely on internals that FiftyOne may change between releases:

- :func:`root_dataset`: ``SampleCollection._root_dataset`` (a view's dataset);
- :func:`dataset_id`: ``dataset._doc.id``, the dataset's id (FiftyOne has no public one);
- :func:`info_entries`: one field of every dataset's ``info``, read from the raw
  ``datasets`` collection (loading every dataset the public way would be slow);
- :func:`set_info_entry`: the dataset's MongoDB document (``dataset._doc.id``) in the
  raw ``datasets`` collection of :func:`fiftyone.core.odm.get_db_conn`;
- :func:`queue_delegated`: ``DelegatedOperationService.queue_operation`` with a
  hand-made ``ExecutionContext`` (what the App does when it queues a job).

Checked against FiftyOne 1.22.1 (the version the test suite runs with). After a
FiftyOne upgrade, run ``tests/test_fiftyone_plugin.py`` (views, concurrent run
summaries, sharded delegated jobs) and ``tests/test_fiftyone_banks.py`` (ids, other
datasets' bank records) and adapt this module only.
"""

from __future__ import annotations

from typing import Any, Iterator

CHECKED_WITH = ("1.22.1",)  # FiftyOne versions these accesses were checked against


def root_dataset(samples):
    """The :class:`fiftyone.core.dataset.Dataset` of a dataset or view (a dataset is its own)."""
    return samples._root_dataset if hasattr(samples, "_root_dataset") else samples


def dataset_id(dataset) -> str:
    """The id of a dataset (its MongoDB document's): unique in the database, kept when the dataset is renamed,
    new for a clone (``dataset.clone()``) or a dataset imported again."""
    return str(dataset._doc.id)


def info_entries(key: str) -> Iterator[tuple[str, str, Any]]:
    """``(dataset id, dataset name, info[key])`` of every dataset in the database whose ``info`` has ``key``."""
    if not key or "." in key or "$" in key:
        raise ValueError(f"{key!r} cannot name an info entry: give a key without '.' or '$'")
    from fiftyone.core.odm import get_db_conn

    for doc in get_db_conn().datasets.find({"info." + key: {"$exists": True}}, {"name": 1, "info." + key: 1}):
        yield str(doc["_id"]), doc.get("name"), (doc.get("info") or {}).get(key)


def set_info_entry(dataset, keys: tuple[str, ...], value: Any) -> bool:
    """Set ``dataset.info[keys[0]][keys[1]]...`` to ``value`` in one MongoDB ``$set`` of that entry alone.

    Concurrent writers (shard jobs on other workers) cannot undo each other's other
    changes to ``info``, which a read-modify-``dataset.save()`` would. Returns False,
    changing nothing, when the keys cannot name a document path (a ``.`` or ``$`` in a
    key) or ``info`` does not hold dicts along the way: the caller then saves ``info``
    the public way. The dataset is reloaded after a write.
    """
    if not keys or any(not k or "." in k or "$" in k for k in keys):
        return False
    dataset.reload()
    node = dataset.info
    for key in keys[:-1]:
        if not isinstance(node, dict):
            return False
        node = node.get(key, {})
    if not isinstance(node, dict):
        return False
    from fiftyone.core.odm import get_db_conn

    get_db_conn().datasets.update_one({"_id": dataset._doc.id}, {"$set": {"info." + ".".join(keys): value}})
    dataset.reload()
    return True


def queue_delegated(operator, request_params: dict) -> str:
    """Queue ``operator`` as a delegated job run with ``request_params`` (an execution context's request);
    the job is named by the operator's ``resolve_run_name``. Returns the job's id."""
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionContext

    ctx = ExecutionContext(request_params=request_params)
    doc = DelegatedOperationService().queue_operation(operator=operator.uri, context=ctx,
                                                      label=operator.resolve_run_name(ctx),
                                                      rerunnable=operator.config.rerunnable)
    return str(doc.id)

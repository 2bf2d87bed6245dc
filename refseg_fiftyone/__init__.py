"""refseg's FiftyOne adapter: the library part of the FiftyOne plugin (``fiftyone_plugin/``).

:mod:`refseg_fiftyone.core` turns FiftyOne samples into refseg calls and refseg results into
FiftyOne labels (building banks from tagged samples, auto-labelling, boxes to masks, review);
:mod:`refseg_fiftyone.convert` converts between refseg's arrays and FiftyOne's ``Detection``.
It needs FiftyOne (``pip install "refseg[fiftyone]"``) and is importable as a plain package::

    from refseg_fiftyone import core
    core.auto_label(dataset.match_tags("unlabelled"), bank_name="default")
"""

"""Contracts shared by the dispatcher Lambda and the Batch worker.

Everything both sides must agree on lives here exactly once: the manifest format,
how a real image type is recognised from its bytes, where outputs are written, and
the CloudEvents documents that describe every object's fate.
"""

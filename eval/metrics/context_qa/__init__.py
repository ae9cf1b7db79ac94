"""The ``context_qa`` metric module (see ``context_qa.py``)."""

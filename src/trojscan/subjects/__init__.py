"""Model families trojscan scans, each a :class:`~trojscan.subjects.base.Subject`.

Importing this package registers every family; a new family is one module here, imported
below.
"""

from trojscan.subjects import (
    extractive_qa,  # noqa: F401  (registers the family)
    text_classification,  # noqa: F401  (registers the family)
    token_classification,  # noqa: F401  (registers the family)
    vqa,  # noqa: F401  (registers the family)
)

"""mdm-pipeline: nightly customer master-data consolidation.

The repository root is this package; each top-level folder owns one stage
(see README.md, "Architecture").
"""

__version__ = "0.1.0"

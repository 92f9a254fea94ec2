"""Allow `python -m mdm_pipeline` where the `mdm` script is not on PATH."""

from mdm_pipeline.cli import main

main()

"""``cipa-bundle``: one verb per pipeline stage, each a thin wrapper over one library function.

Run ``cipa-bundle --help`` or ``cipa-bundle VERB --help``. Bad input ends with a one-line message and exit code 2.
Imports are deferred into each verb so ``cipa-bundle --help`` stays fast and a verb only needs its own dependencies.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["main", "Commands"]


class Commands:
    """CIPA PET-CT lung tumour segmentation (MONAI bundle) command line."""

    def summary(self, img_size: int = 512, dims: int = 96, batch: int = 1, forward: bool = False) -> dict[str, Any]:
        """Print the CIPA network's parameter count per part; with --forward, also time one forward pass.

        Args:
            img_size: square input side in pixels (the paper uses 512).
            dims: stage-0 width of the encoder (the paper uses 96).
            batch: batch size of the timed forward pass.
            forward: run a forward pass on random input and report its time and output shape.
        """
        from cipa_bundle.networks.summary import model_summary

        return model_summary(img_size=img_size, dims=dims, batch=batch, forward=forward)

    def import_official(self, checkpoint: str, out: str) -> str:
        """Convert the released official CIPA checkpoint (CIPA.pth) into this bundle's state_dict (models/model.pt)."""
        from cipa_bundle.networks.official import import_official_checkpoint

        return import_official_checkpoint(checkpoint, out)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    import fire

    from cipa_bundle.errors import CipaInputError

    try:
        fire.Fire(Commands, command=argv, name="cipa-bundle")
    except CipaInputError as err:
        print(f"cipa-bundle: error: {err}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

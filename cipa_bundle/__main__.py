"""``python -m cipa_bundle`` is the same CLI as the ``cipa-bundle`` console script."""

from cipa_bundle.cli import main

if __name__ == "__main__":
    main()

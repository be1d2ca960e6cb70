"""`python -m vmvault`."""

from vmvault.cli.main import main

if __name__ == "__main__":
    main()

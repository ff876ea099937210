from edgespec.cli.main import main

main()

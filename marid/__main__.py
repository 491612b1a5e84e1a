from marid.cli import main

main()

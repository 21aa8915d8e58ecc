from ipserve.cli import main

main()

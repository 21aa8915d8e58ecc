from ipserve.worker.main import main

main()

from orchestra.cli.train import main

main()

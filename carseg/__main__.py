from carseg.cli import main

main()

"""The ``carseg`` command, above both packages: ``training`` brings train, evaluate and data,
``service`` brings serve and worker, and neither imports the other's CLI."""

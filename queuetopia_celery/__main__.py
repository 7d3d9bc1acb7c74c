from queuetopia_celery.cli import main

main()

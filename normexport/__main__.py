from normexport.cli import run

run()

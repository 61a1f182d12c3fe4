from .cli import main

main(prog_name="onnxslim-kit")

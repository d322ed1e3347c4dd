from promptq.cli import main

main()

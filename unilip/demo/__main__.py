from unilip.demo.cli import main

main()

from data_owner_client.cli import main

main()

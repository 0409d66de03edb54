"""The bus contract shared by publishers and the gateway: event schema, key names, publish script."""

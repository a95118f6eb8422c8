"""The gateway process: the public GenerationService (text side) in front of the scheduler.

server: the gRPC servicers, health, drain and the process entry point; validation: public request
checks; tokenizer / detokenizer / response_stream: text in and out; scheduler_link: the one Connect
stream to the scheduler. Nothing here imports the scheduler core.
"""

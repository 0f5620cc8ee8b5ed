"""The Hugging Face Hub: fetching only the files a client or a server needs (`download`), publishing an EE checkpoint
without its key (`upload`), and its model card (`model_card`)."""

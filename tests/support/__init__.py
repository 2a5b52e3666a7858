"""What several test modules share: fake dataset trees, tiny models and runs, hostile files,
reference transcriptions. Test modules import from here, never from one another."""

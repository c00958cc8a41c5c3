"""Face datasets: uploads read and checked, images decoded and prepared, stored arrays,
training batches."""

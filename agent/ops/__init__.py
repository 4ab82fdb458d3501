"""Operations: backup, model installation, the doctor and the daily digest."""

//! Aligned text tables.

use std::io::Write as _;

/// Prints `rows` under `header`, each column as wide as its widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print_table_with(header, rows.len(), |i, cells| {
        for (cell, value) in cells.iter_mut().zip(&rows[i]) {
            cell.push_str(value);
        }
    });
}

/// Prints a table of `rows` rows under `header`; `fill(row, cells)` writes row `row` into
/// cleared, reused buffers. It is called twice per row (to size the columns, then to print),
/// so a million-row table costs no allocation per cell.
pub fn print_table_with(header: &[&str], rows: usize, mut fill: impl FnMut(usize, &mut [String])) {
    let mut cells = vec![String::new(); header.len()];
    let mut fill_row = |i: usize, cells: &mut [String]| {
        cells.iter_mut().for_each(String::clear);
        fill(i, cells);
    };
    // Byte lengths: cells are ASCII but for pod names, where a wide character only shifts
    // the alignment of that row.
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for i in 0..rows {
        fill_row(i, &mut cells);
        for (w, cell) in widths.iter_mut().zip(&cells) {
            *w = (*w).max(cell.len());
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut cells = cells.zip(&widths).peekable();
        while let Some((cell, w)) = cells.next() {
            let _ = if cells.peek().is_none() {
                writeln!(out, "{cell}")
            } else {
                write!(out, "{cell:<w$}  ")
            };
        }
    };
    line(&mut header.iter().copied());
    for i in 0..rows {
        fill_row(i, &mut cells);
        line(&mut cells.iter().map(String::as_str));
    }
}

/// Bytes in a short human form with their unit (512B, 1.5KiB, 20.0MiB).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_carry_their_unit() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(20 << 20), "20.0MiB");
    }
}

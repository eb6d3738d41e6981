//! MovieLens-1M (GroupLens, University of Minnesota): 1,000,209 ratings of about 3,900 movies by
//! 6,040 users. Its licence forbids redistribution, so users download it themselves:
//! [`movielens_1m_files`] lists the published `ml-1m.zip` with its MD5 for
//! [`crate::data::fetch::fetch_files`], [`MOVIELENS_LICENCE`] summarises the usage licence (shown
//! once per output folder, [`licence_notice_due`] / [`record_licence_notice`]), and
//! [`convert_movielens_1m`] reads `users.dat`, `movies.dat` and `ratings.dat` straight from the zip
//! and writes `users.csv`, `items.csv` and `ratings.csv`.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::data::fetch::RemoteFile;
use crate::error::{Error, Result};
use crate::fsutil::atomic_write;

/// Where GroupLens publishes the MovieLens archives.
pub const MOVIELENS_BASE_URL: &str = "https://files.grouplens.org/datasets/movielens";

/// The archive's file name.
pub const MOVIELENS_1M_ZIP: &str = "ml-1m.zip";

/// The published MD5 of `ml-1m.zip`.
pub const MOVIELENS_1M_MD5: &str = "c4d9eecfca2ab87c1945afe126590906";

/// The full usage licence: the README that also ships inside the zip (`ml-1m/README`).
pub const MOVIELENS_LICENCE_URL: &str =
    "https://files.grouplens.org/datasets/movielens/ml-1m-README.txt";

/// A summary of the MovieLens-1M usage licence, with the licence's address.
pub const MOVIELENS_LICENCE: &str = "\
MovieLens-1M is provided by GroupLens Research, University of Minnesota, under its usage licence:
  - it may be used for research; commercial or revenue-bearing use needs prior permission
    from a faculty member of the GroupLens Research Project;
  - do not redistribute the data without separate permission;
  - do not state or imply endorsement by the University of Minnesota or GroupLens;
  - acknowledge the data set in publications by citing F. Maxwell Harper and Joseph A. Konstan.
    2015. The MovieLens Datasets: History and Context. ACM Transactions on Interactive
    Intelligent Systems (TiiS) 5, 4, Article 19. https://doi.org/10.1145/2827872
The data come with no guarantee of correctness or fitness for any purpose.
Full licence: https://files.grouplens.org/datasets/movielens/ml-1m-README.txt (ml-1m/README in the zip)";

/// The file in the output folder that records that the licence was shown (it holds
/// [`MOVIELENS_LICENCE`]).
pub const LICENCE_NOTICE_FILE: &str = "MOVIELENS-LICENCE.txt";

/// `ml-1m.zip` with its published MD5.
pub fn movielens_1m_files() -> Vec<RemoteFile> {
    vec![RemoteFile::with_md5(MOVIELENS_1M_ZIP, MOVIELENS_1M_MD5)]
}

/// Whether the licence is still to be shown for the output folder `dir`: true until
/// [`record_licence_notice`] has written [`LICENCE_NOTICE_FILE`] there.
pub fn licence_notice_due(dir: &Path) -> bool {
    !dir.join(LICENCE_NOTICE_FILE).is_file()
}

/// Writes [`LICENCE_NOTICE_FILE`] (the licence summary) into `dir` (created if needed), so that
/// later fetches into the same folder do not show the licence again; returns its path.
pub fn record_licence_notice(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(LICENCE_NOTICE_FILE);
    atomic_write(&path, format!("{MOVIELENS_LICENCE}\n").as_bytes())?;
    Ok(path)
}

/// What [`convert_movielens_1m`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovieLensSummary {
    /// Rows of `users.csv`.
    pub users: usize,
    /// Rows of `items.csv` (movies).
    pub items: usize,
    /// Rows of `ratings.csv`.
    pub ratings: usize,
    /// The files written: `users.csv`, `items.csv`, `ratings.csv`.
    pub files: Vec<PathBuf>,
}

/// The entries read from the archive.
const USERS_DAT: &str = "ml-1m/users.dat";
const MOVIES_DAT: &str = "ml-1m/movies.dat";
const RATINGS_DAT: &str = "ml-1m/ratings.dat";

/// Reads `ml-1m/users.dat`, `ml-1m/movies.dat` and `ml-1m/ratings.dat` from the zip at
/// `zip_path` (text decoded as ISO-8859-1) and writes into `out_dir` (created if needed):
///
/// - `users.csv`: `user,gender,age,occupation,zip`, the zip code cut to its first 5 characters;
/// - `items.csv`: `item,title,year,genres`, the title as in the file, the year from its trailing
///   `(YYYY)` (empty when there is none), the genres `|`-separated as in the file;
/// - `ratings.csv`: `user,item,rating,timestamp` in file order.
///
/// All three files are read and checked before any is written, and each is written atomically.
/// A malformed line is an error naming the zip, the entry, the line number and what was
/// expected; so is a rating of a user or movie that the other files do not list.
pub fn convert_movielens_1m(zip_path: &Path, out_dir: &Path) -> Result<MovieLensSummary> {
    let handle = std::fs::File::open(zip_path).map_err(|e| Error::io(zip_path, e))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(handle)).map_err(|e| {
        Error::Data(format!(
            "{}: not a valid zip archive ({e}); delete it and fetch it again",
            zip_path.display()
        ))
    })?;
    let users_text = read_latin1(&mut archive, zip_path, USERS_DAT)?;
    let movies_text = read_latin1(&mut archive, zip_path, MOVIES_DAT)?;
    let ratings_text = read_latin1(&mut archive, zip_path, RATINGS_DAT)?;
    let at = |entry: &'static str| Place { zip_path, entry };

    let users = parse_users(&users_text, at(USERS_DAT))?;
    let movies = parse_movies(&movies_text, at(MOVIES_DAT))?;
    let user_ids: HashSet<u32> = users.iter().map(|u| u.id).collect();
    let movie_ids: HashSet<u32> = movies.iter().map(|m| m.id).collect();
    let ratings = parse_ratings(&ratings_text, at(RATINGS_DAT), &user_ids, &movie_ids)?;

    let mut users_csv = CsvOut::new("users.csv", ["user", "gender", "age", "occupation", "zip"])?;
    for user in &users {
        let zip: String = user.zip.chars().take(5).collect();
        users_csv.row([
            user.id.to_string().as_str(),
            user.gender,
            &user.age.to_string(),
            &user.occupation.to_string(),
            &zip,
        ])?;
    }
    let mut items_csv = CsvOut::new("items.csv", ["item", "title", "year", "genres"])?;
    for movie in &movies {
        let year = title_year(movie.title).map_or(String::new(), |y| y.to_string());
        items_csv.row([
            movie.id.to_string().as_str(),
            movie.title,
            &year,
            movie.genres,
        ])?;
    }
    let mut ratings_csv = CsvOut::new("ratings.csv", ["user", "item", "rating", "timestamp"])?;
    for rating in &ratings {
        ratings_csv.row([
            rating.user.to_string().as_str(),
            &rating.item.to_string(),
            &rating.rating.to_string(),
            &rating.timestamp.to_string(),
        ])?;
    }

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut files = Vec::new();
    for out in [users_csv, items_csv, ratings_csv] {
        files.push(out.finish(out_dir)?);
    }
    Ok(MovieLensSummary {
        users: users.len(),
        items: movies.len(),
        ratings: ratings.len(),
        files,
    })
}

/// The year of a title that ends with `(YYYY)`, e.g. `Toy Story (1995)`.
pub fn title_year(title: &str) -> Option<u16> {
    let bytes = title.trim_end().as_bytes();
    let n = bytes.len();
    if n < 6 || bytes[n - 6] != b'(' || bytes[n - 1] != b')' {
        return None;
    }
    let digits = &bytes[n - 5..n - 1];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An entry of the archive, for error messages.
#[derive(Clone, Copy)]
struct Place<'a> {
    zip_path: &'a Path,
    entry: &'static str,
}

impl Place<'_> {
    /// An error about line `number` (1-based) whose text is `line`.
    fn error(&self, number: usize, line: &str, what: &str) -> Error {
        const SHOWN: usize = 120;
        let shown: String = line.chars().take(SHOWN).collect();
        let more = if line.chars().count() > SHOWN {
            "..."
        } else {
            ""
        };
        Error::Data(format!(
            "{}: {}, line {number}: {what}, in `{shown}{more}`; the archive is not the \
             published MovieLens-1M (delete it and fetch it again)",
            self.zip_path.display(),
            self.entry
        ))
    }
}

/// Reads one entry of the archive and decodes it as ISO-8859-1 (each byte is the code point of
/// the same value), which never fails.
fn read_latin1(
    archive: &mut zip::ZipArchive<std::io::BufReader<std::fs::File>>,
    zip_path: &Path,
    name: &str,
) -> Result<String> {
    let mut entry = archive.by_name(name).map_err(|e| {
        Error::Data(format!(
            "{}: no entry `{name}` ({e}); this is not the MovieLens-1M archive (ml-1m.zip)",
            zip_path.display()
        ))
    })?;
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(|e| {
        Error::Data(format!(
            "{}: entry `{name}` is corrupt ({e}); delete the archive and fetch it again",
            zip_path.display()
        ))
    })?;
    Ok(bytes.iter().map(|&b| char::from(b)).collect())
}

/// The non-blank lines of `text` with their 1-based numbers, `\r` line ends removed.
fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix('\r').unwrap_or(line)))
        .filter(|(_, line)| !line.trim().is_empty())
}

/// Splits `line` at `::` into exactly `N` fields.
fn fields<'a, const N: usize>(
    line: &'a str,
    number: usize,
    place: Place<'_>,
    layout: &str,
) -> Result<[&'a str; N]> {
    let parts: Vec<&str> = line.split("::").collect();
    parts.try_into().map_err(|parts: Vec<&str>| {
        place.error(
            number,
            line,
            &format!(
                "expected {layout} ({N} fields separated by `::`), found {} field{}",
                parts.len(),
                if parts.len() == 1 { "" } else { "s" }
            ),
        )
    })
}

/// Parses a whole number field.
fn whole<T: std::str::FromStr>(
    value: &str,
    field: &str,
    number: usize,
    line: &str,
    place: Place<'_>,
) -> Result<T> {
    value.trim().parse().map_err(|_| {
        place.error(
            number,
            line,
            &format!("expected {field} to be a whole number, found `{value}`"),
        )
    })
}

struct User<'a> {
    id: u32,
    gender: &'a str,
    age: u32,
    occupation: u32,
    zip: &'a str,
}

struct Movie<'a> {
    id: u32,
    title: &'a str,
    genres: &'a str,
}

struct Rating {
    user: u32,
    item: u32,
    rating: u8,
    timestamp: u64,
}

/// `UserID::Gender::Age::Occupation::Zip-code` per line.
fn parse_users<'a>(text: &'a str, place: Place<'_>) -> Result<Vec<User<'a>>> {
    const LAYOUT: &str = "UserID::Gender::Age::Occupation::Zip-code";
    let mut seen: HashMap<u32, usize> = HashMap::new();
    let mut users = Vec::new();
    for (number, line) in numbered_lines(text) {
        let [id, gender, age, occupation, zip] = fields::<5>(line, number, place, LAYOUT)?;
        let id: u32 = whole(id, "UserID", number, line, place)?;
        if gender != "M" && gender != "F" {
            return Err(place.error(
                number,
                line,
                &format!("expected Gender to be M or F, found `{gender}`"),
            ));
        }
        let age = whole(age, "Age", number, line, place)?;
        let occupation = whole(occupation, "Occupation", number, line, place)?;
        if zip.trim().is_empty() {
            return Err(place.error(number, line, "expected a Zip-code, found an empty field"));
        }
        if let Some(first) = seen.insert(id, number) {
            return Err(place.error(
                number,
                line,
                &format!("expected each UserID once, but user {id} is also on line {first}"),
            ));
        }
        users.push(User {
            id,
            gender,
            age,
            occupation,
            zip: zip.trim(),
        });
    }
    Ok(users)
}

/// `MovieID::Title::Genres` per line; a title may itself hold `::` (the first and last
/// separators delimit it).
fn parse_movies<'a>(text: &'a str, place: Place<'_>) -> Result<Vec<Movie<'a>>> {
    const LAYOUT: &str = "MovieID::Title::Genres";
    let mut seen: HashMap<u32, usize> = HashMap::new();
    let mut movies = Vec::new();
    for (number, line) in numbered_lines(text) {
        let split = line
            .split_once("::")
            .and_then(|(id, rest)| rest.rsplit_once("::").map(|(title, g)| (id, title, g)));
        let Some((id, title, genres)) = split else {
            let found = line.split("::").count();
            return Err(place.error(
                number,
                line,
                &format!(
                    "expected {LAYOUT} (3 fields separated by `::`), found {found} field{}",
                    if found == 1 { "" } else { "s" }
                ),
            ));
        };
        let id: u32 = whole(id, "MovieID", number, line, place)?;
        if title.trim().is_empty() {
            return Err(place.error(number, line, "expected a Title, found an empty field"));
        }
        if let Some(first) = seen.insert(id, number) {
            return Err(place.error(
                number,
                line,
                &format!("expected each MovieID once, but movie {id} is also on line {first}"),
            ));
        }
        movies.push(Movie {
            id,
            title: title.trim(),
            genres: genres.trim(),
        });
    }
    Ok(movies)
}

/// `UserID::MovieID::Rating::Timestamp` per line, each user and movie listed in the other files.
fn parse_ratings(
    text: &str,
    place: Place<'_>,
    users: &HashSet<u32>,
    movies: &HashSet<u32>,
) -> Result<Vec<Rating>> {
    const LAYOUT: &str = "UserID::MovieID::Rating::Timestamp";
    let mut ratings = Vec::new();
    for (number, line) in numbered_lines(text) {
        let [user, item, rating, timestamp] = fields::<4>(line, number, place, LAYOUT)?;
        let user: u32 = whole(user, "UserID", number, line, place)?;
        let item: u32 = whole(item, "MovieID", number, line, place)?;
        let rating: u8 = match rating.trim().parse() {
            Ok(r @ 1..=5) => r,
            _ => {
                return Err(place.error(
                    number,
                    line,
                    &format!("expected Rating to be a whole number from 1 to 5, found `{rating}`"),
                ))
            }
        };
        let timestamp: u64 = whole(timestamp, "Timestamp", number, line, place)?;
        if !users.contains(&user) {
            return Err(place.error(
                number,
                line,
                &format!("expected a UserID listed in {USERS_DAT}, found user {user}"),
            ));
        }
        if !movies.contains(&item) {
            return Err(place.error(
                number,
                line,
                &format!("expected a MovieID listed in {MOVIES_DAT}, found movie {item}"),
            ));
        }
        ratings.push(Rating {
            user,
            item,
            rating,
            timestamp,
        });
    }
    Ok(ratings)
}

/// A CSV file built in memory, then written atomically.
struct CsvOut {
    name: &'static str,
    writer: ::csv::Writer<Vec<u8>>,
}

impl CsvOut {
    fn new<const N: usize>(name: &'static str, header: [&str; N]) -> Result<Self> {
        let mut out = Self {
            name,
            writer: ::csv::Writer::from_writer(Vec::new()),
        };
        out.row(header)?;
        Ok(out)
    }

    fn row<const N: usize>(&mut self, record: [&str; N]) -> Result<()> {
        self.writer
            .write_record(record)
            .map_err(|e| Error::Data(format!("cannot write {}: {e}", self.name)))
    }

    fn finish(self, dir: &Path) -> Result<PathBuf> {
        let bytes = self
            .writer
            .into_inner()
            .map_err(|e| Error::Data(format!("cannot write {}: {e}", self.name)))?;
        let path = dir.join(self.name);
        atomic_write(&path, &bytes)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A zip in GroupLens' layout holding these three files (bytes as given).
    fn zip_with(users: &[u8], movies: &[u8], ratings: &[u8]) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut zip = zip::ZipWriter::new(&mut out);
        let options = zip::write::SimpleFileOptions::default();
        for (name, bytes) in [
            ("ml-1m/README", b"SUMMARY\n".as_slice()),
            (USERS_DAT, users),
            (MOVIES_DAT, movies),
            (RATINGS_DAT, ratings),
        ] {
            zip.start_file(name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        out.into_inner()
    }

    const USERS: &[u8] = b"1::F::1::10::48067\n2::M::56::16::70072-1234\n";
    const RATINGS: &[u8] = b"2::3::4::978300760\n1::1::5::978302109\n1::3::3::978301968\n";

    /// Movies with a latin-1 title (0xE9 is `é`), a comma, and a title without a year.
    fn movies() -> Vec<u8> {
        let mut bytes = b"1::Toy Story (1995)::Animation|Children's|Comedy\n".to_vec();
        bytes.extend_from_slice(b"3::Mis\xe9rables, Les (1995)::Drama|Musical\r\n");
        bytes.extend_from_slice(b"7::Untitled::Documentary\n");
        bytes
    }

    fn convert(zip_bytes: &[u8]) -> (tempfile::TempDir, Result<MovieLensSummary>) {
        let dir = tempfile::tempdir().unwrap();
        let zip_path = dir.path().join("ml-1m.zip");
        std::fs::write(&zip_path, zip_bytes).unwrap();
        let result = convert_movielens_1m(&zip_path, &dir.path().join("out"));
        (dir, result)
    }

    fn records(path: &Path) -> Vec<Vec<String>> {
        let mut reader = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(path)
            .unwrap();
        reader
            .records()
            .map(|r| r.unwrap().iter().map(str::to_string).collect())
            .collect()
    }

    #[test]
    fn converts_the_three_files() {
        let (dir, result) = convert(&zip_with(USERS, &movies(), RATINGS));
        let summary = result.unwrap();
        let out = dir.path().join("out");
        assert_eq!((summary.users, summary.items, summary.ratings), (2, 3, 3));
        assert_eq!(
            summary.files,
            vec![
                out.join("users.csv"),
                out.join("items.csv"),
                out.join("ratings.csv")
            ]
        );
        assert_eq!(
            std::fs::read_to_string(out.join("users.csv")).unwrap(),
            "user,gender,age,occupation,zip\n1,F,1,10,48067\n2,M,56,16,70072\n"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("items.csv")).unwrap(),
            "item,title,year,genres\n\
             1,Toy Story (1995),1995,Animation|Children's|Comedy\n\
             3,\"Misérables, Les (1995)\",1995,Drama|Musical\n\
             7,Untitled,,Documentary\n"
        );
        assert_eq!(
            records(&out.join("ratings.csv")),
            vec![
                vec!["user", "item", "rating", "timestamp"],
                vec!["2", "3", "4", "978300760"],
                vec!["1", "1", "5", "978302109"],
                vec!["1", "3", "3", "978301968"],
            ]
        );
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["items.csv", "ratings.csv", "users.csv"]);
    }

    /// The sample archive with `entry` holding `bytes`.
    fn zip_replacing(entry: &str, bytes: &[u8]) -> Vec<u8> {
        let movies = movies();
        let pick = |name: &str, sample: &[u8]| -> Vec<u8> {
            if name == entry { bytes } else { sample }.to_vec()
        };
        zip_with(
            &pick(USERS_DAT, USERS),
            &pick(MOVIES_DAT, &movies),
            &pick(RATINGS_DAT, RATINGS),
        )
    }

    #[test]
    fn malformed_lines_name_entry_line_and_expectation_and_write_nothing() {
        let cases: [(&str, &[u8], &str, &str); 9] = [
            (
                USERS_DAT,
                b"1::F::1::10::48067\n2::M::56::16\n",
                "ml-1m/users.dat, line 2",
                "UserID::Gender::Age::Occupation::Zip-code (5 fields separated by `::`), found 4",
            ),
            (
                USERS_DAT,
                b"1::X::1::10::48067\n",
                "ml-1m/users.dat, line 1",
                "Gender to be M or F, found `X`",
            ),
            (
                USERS_DAT,
                b"1::F::1::10::48067\n1::M::56::16::70072\n",
                "ml-1m/users.dat, line 2",
                "user 1 is also on line 1",
            ),
            (
                MOVIES_DAT,
                b"1::Toy Story (1995)::Animation\nx::Heat (1995)::Action\n",
                "ml-1m/movies.dat, line 2",
                "MovieID to be a whole number, found `x`",
            ),
            (
                MOVIES_DAT,
                b"1 Toy Story (1995)\n",
                "ml-1m/movies.dat, line 1",
                "MovieID::Title::Genres (3 fields",
            ),
            (
                RATINGS_DAT,
                b"1::1::5::978302109\n\n1::3::6::978301968\n",
                "ml-1m/ratings.dat, line 3",
                "Rating to be a whole number from 1 to 5, found `6`",
            ),
            (
                RATINGS_DAT,
                b"1::1::5\n",
                "ml-1m/ratings.dat, line 1",
                "found 3 fields",
            ),
            (
                RATINGS_DAT,
                b"9::1::5::978302109\n",
                "ml-1m/ratings.dat, line 1",
                "UserID listed in ml-1m/users.dat, found user 9",
            ),
            (
                RATINGS_DAT,
                b"1::2::5::978302109\n",
                "ml-1m/ratings.dat, line 1",
                "MovieID listed in ml-1m/movies.dat, found movie 2",
            ),
        ];
        for (entry, bytes, place, what) in cases {
            let (dir, result) = convert(&zip_replacing(entry, bytes));
            let err = result
                .expect_err("a malformed line is an error")
                .to_string();
            assert!(err.contains("ml-1m.zip"), "{err}");
            assert!(err.contains(place), "{place}: {err}");
            assert!(err.contains(what), "{what}: {err}");
            assert!(!dir.path().join("out").exists(), "{err}");
        }
    }

    #[test]
    fn other_archives_are_refused() {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut zip = zip::ZipWriter::new(&mut out);
        zip.start_file("ml-100k/u.data", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.finish().unwrap();
        let (_dir, result) = convert(&out.into_inner());
        let err = result.unwrap_err().to_string();
        assert!(err.contains("ml-1m/users.dat"), "{err}");
        let (_dir, result) = convert(b"not a zip");
        let err = result.unwrap_err().to_string();
        assert!(err.contains("not a valid zip"), "{err}");
    }

    #[test]
    fn years_come_from_a_trailing_parenthesised_number() {
        assert_eq!(title_year("Toy Story (1995)"), Some(1995));
        assert_eq!(title_year("City of Lost Children, The (1995) "), Some(1995));
        assert_eq!(title_year("Misérables (1995)"), Some(1995));
        assert_eq!(title_year("Untitled"), None);
        assert_eq!(title_year("(1995) Remake"), None);
        assert_eq!(title_year("Short (95)"), None);
        assert_eq!(title_year("é(abcd)"), None);
    }

    #[test]
    fn the_licence_is_due_until_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("movielens-1m");
        assert!(licence_notice_due(&out));
        let path = record_licence_notice(&out).unwrap();
        assert_eq!(path, out.join(LICENCE_NOTICE_FILE));
        assert!(!licence_notice_due(&out));
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("Harper") && text.contains(MOVIELENS_LICENCE_URL));
        assert!(MOVIELENS_LICENCE.contains(MOVIELENS_LICENCE_URL));
    }
}

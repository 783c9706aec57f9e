"""Field numbers of pprof's profile.proto (package perftools.profiles).

Each constant quotes the .proto definition it stands for, so a reader can
check the numbers without the schema at hand. Fields the agent does not
model (Profile.tick_unit / label_set, Sample.breakdown: experimental
additions that Go's pprof does not read) are skipped as unknown fields.
"""

# message Profile
PROFILE_SAMPLE_TYPE = 1  # repeated ValueType sample_type = 1;
PROFILE_SAMPLE = 2  # repeated Sample sample = 2;
PROFILE_MAPPING = 3  # repeated Mapping mapping = 3;
PROFILE_LOCATION = 4  # repeated Location location = 4;
PROFILE_FUNCTION = 5  # repeated Function function = 5;
PROFILE_STRING_TABLE = 6  # repeated string string_table = 6;
PROFILE_DROP_FRAMES = 7  # int64 drop_frames = 7;   // Index into string table.
PROFILE_KEEP_FRAMES = 8  # int64 keep_frames = 8;  // Index into string table.
PROFILE_TIME_NANOS = 9  # int64 time_nanos = 9;
PROFILE_DURATION_NANOS = 10  # int64 duration_nanos = 10;
PROFILE_PERIOD_TYPE = 11  # ValueType period_type = 11;
PROFILE_PERIOD = 12  # int64 period = 12;
PROFILE_COMMENT = 13  # repeated int64 comment = 13; // Indices into string table.
PROFILE_DEFAULT_SAMPLE_TYPE = 14  # int64 default_sample_type = 14;

# message ValueType
VALUE_TYPE_TYPE = 1  # int64 type = 1; // Index into string table.
VALUE_TYPE_UNIT = 2  # int64 unit = 2; // Index into string table.

# message Sample
SAMPLE_LOCATION_ID = 1  # repeated uint64 location_id = 1;
SAMPLE_VALUE = 2  # repeated int64 value = 2;
SAMPLE_LABEL = 3  # repeated Label label = 3;

# message Label
LABEL_KEY = 1  # int64 key = 1;   // Index into string table
LABEL_STR = 2  # int64 str = 2;   // Index into string table
LABEL_NUM = 3  # int64 num = 3;
LABEL_NUM_UNIT = 4  # int64 num_unit = 4;  // Index into string table

# message Mapping
MAPPING_ID = 1  # uint64 id = 1;
MAPPING_MEMORY_START = 2  # uint64 memory_start = 2;
MAPPING_MEMORY_LIMIT = 3  # uint64 memory_limit = 3;
MAPPING_FILE_OFFSET = 4  # uint64 file_offset = 4;
MAPPING_FILENAME = 5  # int64 filename = 5;  // Index into string table
MAPPING_BUILD_ID = 6  # int64 build_id = 6;  // Index into string table
MAPPING_HAS_FUNCTIONS = 7  # bool has_functions = 7;
MAPPING_HAS_FILENAMES = 8  # bool has_filenames = 8;
MAPPING_HAS_LINE_NUMBERS = 9  # bool has_line_numbers = 9;
MAPPING_HAS_INLINE_FRAMES = 10  # bool has_inline_frames = 10;

# message Location
LOCATION_ID = 1  # uint64 id = 1;
LOCATION_MAPPING_ID = 2  # uint64 mapping_id = 2;
LOCATION_ADDRESS = 3  # uint64 address = 3;
LOCATION_LINE = 4  # repeated Line line = 4;
LOCATION_IS_FOLDED = 5  # bool is_folded = 5;

# message Line
LINE_FUNCTION_ID = 1  # uint64 function_id = 1;
LINE_LINE = 2  # int64 line = 2;
LINE_COLUMN = 3  # int64 column = 3;  (newer profile.proto; older readers skip it)

# message Function
FUNCTION_ID = 1  # uint64 id = 1;
FUNCTION_NAME = 2  # int64 name = 2; // Index into string table
FUNCTION_SYSTEM_NAME = 3  # int64 system_name = 3; // Index into string table
FUNCTION_FILENAME = 4  # int64 filename = 4; // Index into string table
FUNCTION_START_LINE = 5  # int64 start_line = 5;

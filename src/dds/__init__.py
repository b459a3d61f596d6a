from dds.errors import DDSError
